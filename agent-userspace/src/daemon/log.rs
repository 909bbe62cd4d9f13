//! The daemon's own log (tracing, on stderr): each event is written whole, with every
//! known secret masked by the same search and marker as the audit trail's records. A name
//! or value a sandbox sent (a TLS server name, a path) can reach a log line; the secret in
//! it never does.

use std::io::Write;
use std::sync::LazyLock;

use crate::audit::{FindSecrets, Redactor};

static REDACTOR: LazyLock<Redactor> = LazyLock::new(Redactor::default);

/// Installs the search for secrets in log lines; only the first call counts.
pub fn redact_with(find: FindSecrets) -> bool {
    REDACTOR.install(find)
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
        let mut text = String::from_utf8_lossy(&self.0).into_owned();
        REDACTOR.mask_string(&mut text);
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
}
