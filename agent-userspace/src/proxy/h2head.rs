//! The header timer of an HTTP/2 connection from a sandbox.
//!
//! A request's header block is a HEADERS frame and the CONTINUATION frames after it, up to
//! the end of the one flagged END_HEADERS. While a block is open the HTTP/2 layer can take
//! no other frame on the connection, so a client that stops in the middle of one, or
//! drips it (a frame's payload a byte at a time), would hold the connection, unrecorded,
//! until `idle_secs` or for ever. The same holds for any other frame but DATA (a slow
//! upload is allowed, as over HTTP/1.1) and for the connection preface. [`H2HeadTimed`]
//! follows the frame headers the client sends and fails the read once such a part has
//! been incomplete for `header_secs`; the connection then ends and the caller records the
//! request as refused (see [`HeadClock::timed_out`]). Time the server spends unable to
//! write (a client not reading what it is sent stops the HTTP/2 layer from reading) does
//! not count, as an HTTP/1 head waiting behind a response is not timed.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    time::Instant,
};

use super::{head::HeadClock, io::Deadline};

/// The client connection preface (RFC 9113, 3.4), before the first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Follows the frames a client sends: whether something the client must send whole (the
/// preface, a header block, a frame other than DATA) has begun and not ended.
#[derive(Debug)]
pub struct BlockScan {
    /// Preface bytes still to pass.
    preface_left: usize,
    header: [u8; FRAME_HEADER_LEN],
    have: usize,
    /// The frame whose payload is being passed, and how much of it is left.
    kind: u8,
    skip: usize,
    /// A header block has begun, and not all of its END_HEADERS frame has arrived.
    in_block: bool,
    /// The frame being passed ends the header block.
    ends_block: bool,
    /// The open header block opens a request: a HEADERS frame on a stream above every
    /// earlier request's (not trailers, not a server's PUSH_PROMISE).
    block_request: Option<u32>,
    /// The stream of the last request whose header block was complete.
    last_request: u32,
    /// Requests whose header block was complete.
    requests: u64,
}

impl Default for BlockScan {
    fn default() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            have: 0,
            kind: DATA,
            skip: 0,
            in_block: false,
            ends_block: false,
            block_request: None,
            last_request: 0,
            requests: 0,
        }
    }
}

impl BlockScan {
    /// Requests whose whole header block has arrived: each reaches the proxy's handler
    /// or is refused by the HTTP/2 layer.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Whether the client is in the middle of something it must send whole.
    pub fn open(&self) -> bool {
        (self.preface_left > 0 && self.preface_left < PREFACE_LEN)
            || self.in_block
            || self.have > 0
            || (self.skip > 0 && self.kind != DATA)
    }

    /// Feeds bytes read from the client, in order. Returns whether something began that
    /// is still open at the end of them.
    pub fn feed(&mut self, mut data: &[u8]) -> bool {
        let mut began = false;
        let mut was_open = self.open();
        while !data.is_empty() {
            if self.preface_left > 0 {
                let take = self.preface_left.min(data.len());
                self.preface_left -= take;
                data = &data[take..];
            } else if self.skip > 0 {
                let take = self.skip.min(data.len());
                self.skip -= take;
                data = &data[take..];
                if self.skip == 0 {
                    self.frame_done();
                }
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
                    self.kind = h[3];
                    self.ends_block = false;
                    if matches!(self.kind, HEADERS | PUSH_PROMISE | CONTINUATION) {
                        if !self.in_block {
                            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                            self.block_request = (self.kind == HEADERS
                                && stream > self.last_request)
                                .then_some(stream);
                        }
                        self.in_block = true;
                        self.ends_block = h[4] & END_HEADERS != 0;
                    }
                    if self.skip == 0 {
                        self.frame_done();
                    }
                }
            }
            let open = self.open();
            began |= open && !was_open;
            was_open = open;
        }
        began && was_open
    }

    fn frame_done(&mut self) {
        if self.ends_block {
            self.in_block = false;
            self.ends_block = false;
            if let Some(stream) = self.block_request.take() {
                self.last_request = stream;
                self.requests += 1;
            }
        }
        self.kind = DATA;
    }
}

/// The stream hyper's HTTP/2 server reads and writes, failing reads once the client has
/// left something incomplete (see [`BlockScan`]) for `limit` (told to `clock`, so that the
/// connection's end is recorded as a refusal).
pub struct H2HeadTimed<S> {
    inner: S,
    scan: BlockScan,
    clock: Arc<HeadClock>,
    limit: Duration,
    /// When the open part began (moved later by the time writes were stalled).
    since: Option<Instant>,
    /// Since when the server's writes have been waiting for the client to read.
    stalled: Option<Instant>,
    deadline: Deadline,
}

impl<S> H2HeadTimed<S> {
    pub fn new(inner: S, clock: Arc<HeadClock>, limit: Duration) -> Self {
        Self {
            inner,
            scan: BlockScan::default(),
            clock,
            limit,
            since: None,
            stalled: None,
            deadline: Deadline::default(),
        }
    }

    /// Notes whether a write had to wait: time stalled does not count against the
    /// client's open part.
    fn wrote(&mut self, pending: bool) {
        match (pending, self.stalled) {
            (true, None) => self.stalled = Some(Instant::now()),
            (false, Some(stalled)) => {
                self.stalled = None;
                if let Some(since) = &mut self.since {
                    *since += Instant::now().saturating_duration_since(stalled.max(*since));
                }
            }
            _ => {}
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
            let began = this.scan.feed(&buf.filled()[before..]);
            let open = this.scan.open();
            if !open {
                this.since = None;
            } else if began || this.since.is_none() {
                this.since = Some(Instant::now());
            }
            this.clock.set_h2_open(open);
            this.clock.set_h2_requests(this.scan.requests());
        }
        let Some(since) = this.since else {
            return poll;
        };
        if this.stalled.is_some() {
            return poll;
        }
        let deadline = since + this.limit;
        let expired = match poll {
            Poll::Ready(Ok(())) => Instant::now() >= deadline,
            Poll::Pending => this.deadline.poll_at(deadline, cx),
            Poll::Ready(Err(_)) => false,
        };
        if !expired {
            return poll;
        }
        this.clock.time_out();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "HTTP/2 header block or frame not complete {} s after it began",
                this.limit.as_secs()
            ),
        )))
    }
}

super::io::write_through!(H2HeadTimed, observe = wrote);

/// One HTTP/2 frame's bytes, for tests that speak the protocol by hand.
#[cfg(test)]
pub(super) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[test]
    fn requests_are_counted_once_their_block_is_whole_and_trailers_are_not() {
        let mut scan = BlockScan::default();
        scan.feed(PREFACE);
        scan.feed(&frame(0x4, 0, 0, &[]));
        scan.feed(&frame(HEADERS, END_HEADERS, 1, &[0x82; 5]));
        assert_eq!(scan.requests(), 1);
        // Trailers on the same stream, then DATA: no new request.
        scan.feed(&frame(HEADERS, END_HEADERS | 0x1, 1, &[0x90; 3]));
        scan.feed(&frame(DATA, 0, 1, &[0; 8]));
        assert_eq!(scan.requests(), 1);
        // A block in two frames counts once, with the last byte of its END_HEADERS frame.
        scan.feed(&frame(HEADERS, 0, 3, &[0x82; 5]));
        let last = frame(CONTINUATION, END_HEADERS, 3, &[0x90; 4]);
        scan.feed(&last[..last.len() - 1]);
        assert_eq!(scan.requests(), 1);
        scan.feed(&last[last.len() - 1..]);
        assert_eq!(scan.requests(), 2);
        // A PUSH_PROMISE opens no request of the client's.
        scan.feed(&frame(PUSH_PROMISE, END_HEADERS, 3, &[0, 0, 0, 4, 0x82]));
        assert_eq!(scan.requests(), 2);
    }

    #[test]
    fn a_block_is_open_from_its_headers_to_the_end_of_end_headers() {
        let mut scan = BlockScan::default();
        assert!(!scan.open());
        assert!(scan.feed(&PREFACE[..10]), "a preface begun");
        assert!(!scan.feed(&PREFACE[10..]));
        assert!(!scan.open());
        scan.feed(&frame(0x4, 0, 0, &[]));
        assert!(!scan.open());
        // HEADERS without END_HEADERS, whose payload happens to look like frame headers.
        assert!(scan.feed(&frame(HEADERS, 0x1, 1, &[0x1; 20])));
        assert!(scan.open());
        assert!(!scan.feed(&frame(CONTINUATION, 0, 1, &[0x9; 30])));
        assert!(scan.open());
        // The END_HEADERS frame ends the block with its last byte, not its header.
        let last = frame(CONTINUATION, END_HEADERS, 1, &[0x4; 7]);
        for b in &last[..last.len() - 1] {
            scan.feed(&[*b]);
            assert!(scan.open());
        }
        scan.feed(&last[last.len() - 1..]);
        assert!(!scan.open());
        // A whole block in one frame is open until its payload is in.
        let whole = frame(HEADERS, END_HEADERS | 0x1, 3, &[0x82; 5]);
        assert!(scan.feed(&whole[..12]));
        assert!(scan.open());
        scan.feed(&whole[12..]);
        assert!(!scan.open());
        // A DATA frame may arrive slowly; other frames are timed like header blocks.
        let data = frame(DATA, 0x1, 3, &[0; 100]);
        assert!(!scan.feed(&data[..50]));
        assert!(!scan.open());
        scan.feed(&data[50..]);
        let ping = frame(0x6, 0, 0, &[0; 8]);
        assert!(scan.feed(&ping[..11]));
        scan.feed(&ping[11..]);
        assert!(!scan.open());
        // A frame header cut short is open.
        assert!(scan.feed(&ping[..4]));
        scan.feed(&ping[4..]);
        assert!(!scan.open());
        // A block that ends and another that begins in one read: the second began.
        let mut two = frame(HEADERS, END_HEADERS, 5, &[0x82]);
        two.extend(frame(HEADERS, 0, 7, &[0x82]));
        assert!(scan.feed(&two));
        assert!(scan.open());
    }
}
