//! The daemon's own log (tracing, on stderr): each event is written whole, with every
//! known secret masked, as the audit trail's records are. A name or value a sandbox sent
//! (a TLS server name, a path) can reach a log line; the secret in it never does.

use std::io::Write;
use std::sync::OnceLock;

use crate::audit::FindSecrets;

/// What stands in for a masked byte: `[redacted]`, then `*` for as long as the secret was.
const MARKER: &[u8] = b"[redacted]";

static FIND: OnceLock<FindSecrets> = OnceLock::new();

/// Installs the search for secrets in log lines; only the first call counts.
pub fn redact_with(find: FindSecrets) -> bool {
    FIND.set(find).is_ok()
}

/// One log event, collected as it is formatted and written to stderr (masked) when
/// dropped: the `MakeWriter` tracing's formatter takes.
#[derive(Default)]
pub struct LogLine(Vec<u8>);

impl LogLine {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        mask(&mut self.0);
        let _ = std::io::stderr().write_all(&self.0);
    }
}

/// Masks every secret the installed search finds in `text`.
fn mask(text: &mut [u8]) {
    let Some(find) = FIND.get() else {
        return;
    };
    for range in find(text) {
        let Some(bytes) = text.get_mut(range) else {
            continue;
        };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = MARKER.get(i).copied().unwrap_or(b'*');
        }
    }
}
