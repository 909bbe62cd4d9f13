//! The header timer of an HTTP/2 connection from a sandbox.
//!
//! A request's header block is a HEADERS frame and the CONTINUATION frames after it, up to
//! the one flagged END_HEADERS. While a block is open the HTTP/2 layer can take no other
//! frame on the connection, so a client that stops in the middle of one (or drips
//! CONTINUATION frames) would hold the connection, unrecorded, until `idle_secs` or
//! forever. [`H2HeadTimed`] follows the frame headers the client sends and fails the read
//! once a block has been open for `header_secs`; the connection then ends and the caller
//! records the request as refused (see [`HeadClock::timed_out`]).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    time::{Instant, Sleep},
};

use super::head::HeadClock;

/// The client connection preface (RFC 9113, 3.4), before the first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Follows the frames a client sends: whether a header block is open.
#[derive(Debug)]
pub struct BlockScan {
    /// Preface bytes still to pass.
    preface_left: usize,
    header: [u8; FRAME_HEADER_LEN],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
    open: bool,
}

impl Default for BlockScan {
    fn default() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            have: 0,
            skip: 0,
            open: false,
        }
    }
}

impl BlockScan {
    /// Whether a header block has begun and not ended.
    pub fn open(&self) -> bool {
        self.open
    }

    /// Feeds bytes read from the client, in order.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.preface_left > 0 {
                let take = self.preface_left.min(data.len());
                self.preface_left -= take;
                data = &data[take..];
            } else if self.skip > 0 {
                let take = self.skip.min(data.len());
                self.skip -= take;
                data = &data[take..];
            } else {
                let take = (FRAME_HEADER_LEN - self.have).min(data.len());
                self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have == FRAME_HEADER_LEN {
                    self.have = 0;
                    let h = &self.header;
                    self.skip =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let ends = h[4] & END_HEADERS != 0;
                    match h[3] {
                        HEADERS | PUSH_PROMISE => self.open = !ends,
                        CONTINUATION if ends => self.open = false,
                        _ => {}
                    }
                }
            }
        }
    }
}

/// The stream hyper's HTTP/2 server reads, failing once a header block has been open for
/// `limit` (told to `clock`, so that the connection's end is recorded as a refusal).
pub struct H2HeadTimed<S> {
    inner: S,
    scan: BlockScan,
    clock: Arc<HeadClock>,
    limit: Duration,
    /// When the open header block began.
    since: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> H2HeadTimed<S> {
    pub fn new(inner: S, clock: Arc<HeadClock>, limit: Duration) -> Self {
        Self {
            inner,
            scan: BlockScan::default(),
            clock,
            limit,
            since: None,
            sleep: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H2HeadTimed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            this.scan.feed(&buf.filled()[before..]);
            match (this.since, this.scan.open()) {
                (None, true) => this.since = Some(Instant::now()),
                (Some(_), false) => this.since = None,
                _ => {}
            }
        }
        let Some(since) = this.since else {
            return poll;
        };
        let deadline = since + this.limit;
        let expired = match poll {
            // Bytes of the block (or of nothing else: the layer can take nothing else)
            // still count against the block's time.
            Poll::Ready(Ok(())) => Instant::now() >= deadline,
            Poll::Pending => {
                let sleep = match &mut this.sleep {
                    Some(sleep) => {
                        if sleep.deadline() != deadline {
                            sleep.as_mut().reset(deadline);
                        }
                        sleep
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                sleep.as_mut().poll(cx).is_ready()
            }
            Poll::Ready(Err(_)) => false,
        };
        if !expired {
            return poll;
        }
        this.clock.time_out();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "HTTP/2 request header block not complete {} s after its first frame",
                this.limit.as_secs()
            ),
        )))
    }
}

super::io::write_through!(H2HeadTimed);

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_block_is_open_from_its_headers_to_end_headers() {
        let mut scan = BlockScan::default();
        scan.feed(PREFACE);
        scan.feed(&frame(0x4, 0, 0, &[]));
        assert!(!scan.open());
        // HEADERS without END_HEADERS, whose payload happens to look like frame headers.
        let headers = frame(HEADERS, 0x1, 1, &[0x1; 20]);
        scan.feed(&headers);
        assert!(scan.open());
        scan.feed(&frame(CONTINUATION, 0, 1, &[0x9; 30]));
        assert!(scan.open());
        // Fed a byte at a time.
        for b in frame(CONTINUATION, END_HEADERS, 1, &[0x4; 7]) {
            scan.feed(&[b]);
        }
        assert!(!scan.open());
        // A whole block in one frame never counts as open.
        scan.feed(&frame(HEADERS, END_HEADERS | 0x1, 3, &[0x82]));
        assert!(!scan.open());
        // DATA and PING frames change nothing.
        scan.feed(&frame(0x0, 0x1, 3, &[0; 100]));
        scan.feed(&frame(0x6, 0, 0, &[0; 8]));
        assert!(!scan.open());
    }
}
