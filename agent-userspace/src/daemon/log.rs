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

/// Masks every known secret in `text` as log lines are masked: for text the daemon keeps
/// and shows outside the audit trail (a quarantine's reason, in its state and status).
pub fn mask(text: &mut String) {
    REDACTOR.mask_string(text);
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

/// Longest log line written (a longer one is cut, ending in `...`).
const MAX_LINE: usize = 16 * 1024;

/// The line as written: masked, then every control, bidirectional and zero-width
/// character escaped (a newline or escape sequence a sandbox put in a name cannot forge
/// a line or drive a terminal), one `\n` at the end.
fn render(bytes: &[u8], mask: impl Fn(&mut String)) -> String {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.ends_with('\n') {
        text.pop();
    }
    mask(&mut text);
    let mut line = crate::text::sanitize(&text, MAX_LINE);
    line.push('\n');
    line
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let line = render(&self.0, |t| REDACTOR.mask_string(t));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn one_event_is_one_line_whatever_it_quotes() {
        let out = render(
            b"WARN refused name=\"a\nINFO forged\x1b]0;x\x07\" ok\n",
            |_| {},
        );
        assert_eq!(out.matches('\n').count(), 1);
        assert!(out.ends_with('\n'));
        assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
        assert!(out.contains("\\u{a}INFO forged"), "{out:?}");
        // Masked before it is escaped, the newline kept.
        let out = render(b"token=SECRET\n", |t| {
            *t = t.replace("SECRET", "[redacted]")
        });
        assert_eq!(out, "token=[redacted]\n");
    }
}
