//! Blocking client used by `egressctl`.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context};

use super::{Request, Response};

/// Sends one request and waits for its response.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    call_timeout(socket, request, Duration::from_secs(30))
}

/// Sends one request and waits at most `timeout` for each read and write (a hung
/// daemon makes this fail instead of blocking its caller).
pub fn call_timeout(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to egressd at {} (is `egressd run` running, are you root, and does \
             the daemon use this socket? Another is named with --socket or EGRESSD_SOCKET, \
             as its config's `socket:` says)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // The daemon may answer (e.g. that the request is too large) and close before taking
    // all of it: then its answer, not the broken pipe, is what to report.
    let sent = stream.write_all(&line);
    let mut reader = BufReader::new(stream);
    let mut resp = String::new();
    reader
        .read_line(&mut resp)
        .context("reading egressd's response")?;
    if resp.is_empty() {
        sent.context("sending the request to egressd")?;
        bail!("egressd closed the connection without answering");
    }
    serde_json::from_str(&resp).context("decoding egressd's response")
}
