//! Placeholders: per-sandbox sentinels that stand in for a credential's value.
//!
//! A credential with `inject: { placeholder: {} }` is never added to requests by itself.
//! Each sandbox is given its own sentinel for it (`egressctl placeholder SANDBOX
//! CREDENTIAL` prints it), `egress-placeholder-` followed by 32 hex digits, to put wherever
//! its client insists on a key (a config file, an SDK constructor). The proxy replaces
//! the sentinel with the value only in requests its rule allows to the credential's
//! hosts, and there only where the credential's `inject.placeholder` allows (see
//! `proxy/inject.rs`); a sentinel seen anywhere else refuses the request.
//!
//! The sentinel is an HMAC-SHA256 of the sandbox and credential names under a key the
//! daemon keeps in `<state_dir>/placeholder.key` (made on first start, mode 0600), so a
//! sandbox keeps its sentinels across daemon restarts and nothing per sandbox is stored.
//! Removing the key file gives every sandbox new sentinels at the next start. A sentinel
//! is not a secret: it works only in requests of the sandbox it was made for.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::{Arc, Mutex};

use aho_corasick::AhoCorasick;
use ring::hmac;
use ring::rand::SecureRandom as _;

use super::error::CredentialError;
use super::matcher::SecretMatcher;

/// Every sentinel starts with this.
pub const PREFIX: &str = "egress-placeholder-";
/// The key file's name in the state directory.
pub const KEY_FILE: &str = "placeholder.key";
const KEY_BYTES: usize = 32;
/// Sandboxes whose sentinel sets are kept built; the cache is emptied beyond this.
const MAX_CACHED: usize = 4096;

/// The key sentinels are derived with, and the sets built per sandbox.
pub(super) struct Placeholders {
    key: hmac::Key,
    /// Names of the credentials injected as placeholders, sorted.
    credentials: Vec<String>,
    cache: Mutex<HashMap<String, Arc<SandboxPlaceholders>>>,
}

impl std::fmt::Debug for Placeholders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placeholders")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl Default for Placeholders {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Placeholders {
    /// A random key held in memory only (until [`Self::load_key`]).
    pub(super) fn new(credentials: Vec<String>) -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        // SystemRandom fails only where the kernel has no random source at all; the
        // all-zero key is then replaced by `load_key` or the daemon refuses to start.
        let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
        Self::with_key(credentials, &bytes)
    }

    fn with_key(credentials: Vec<String>, key: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            credentials,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Uses the key in `<dir>/placeholder.key`, creating it (0600) if it does not exist.
    pub(super) fn load_key(&mut self, dir: &Path) -> Result<(), CredentialError> {
        let path = dir.join(KEY_FILE);
        let err = |source| CredentialError::Read {
            credential: "(placeholder key)".to_owned(),
            path: path.clone(),
            source,
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => {
                // A key others can read lets them make every sandbox's sentinels (and
                // spend another's credential as it): refused, as the CA's key is.
                let mode = std::fs::metadata(&path).map_err(err)?.permissions().mode() & 0o7777;
                if mode & 0o077 != 0 {
                    return Err(err(std::io::Error::other(format!(
                        "mode {mode:04o} lets others read it; chmod 600 it"
                    ))));
                }
                zeroize::Zeroizing::new(bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = zeroize::Zeroizing::new(vec![0u8; KEY_BYTES]);
                ring::rand::SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| err(std::io::Error::other("no random source")))?;
                std::fs::create_dir_all(dir).map_err(err)?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(err)?;
                file.write_all(&bytes).map_err(err)?;
                file.sync_all().map_err(err)?;
                bytes
            }
            Err(e) => return Err(err(e)),
        };
        if bytes.len() != KEY_BYTES {
            return Err(err(std::io::Error::other(format!(
                "holds {} bytes, not {KEY_BYTES}; remove it to make a new one",
                bytes.len()
            ))));
        }
        *self = Self::with_key(std::mem::take(&mut self.credentials), &bytes);
        Ok(())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.credentials.is_empty()
    }

    /// Sandbox `sandbox`'s sentinel for `credential` (which must be a placeholder
    /// credential; not checked here).
    pub(super) fn sentinel(&self, sandbox: &str, credential: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"egressd placeholder v1\0");
        ctx.update(sandbox.as_bytes());
        ctx.update(b"\0");
        ctx.update(credential.as_bytes());
        let tag = ctx.sign();
        let mut out = String::with_capacity(PREFIX.len() + 32);
        out.push_str(PREFIX);
        for b in &tag.as_ref()[..16] {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// Sandbox `sandbox`'s sentinels, built once and cached; `None` when no credential is
    /// a placeholder.
    pub(super) fn for_sandbox(&self, sandbox: &str) -> Option<Arc<SandboxPlaceholders>> {
        if self.credentials.is_empty() {
            return None;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = cache.get(sandbox) {
            return Some(set.clone());
        }
        let sentinels: Vec<(String, String)> = self
            .credentials
            .iter()
            .map(|c| (c.clone(), self.sentinel(sandbox, c)))
            .collect();
        let set = Arc::new(SandboxPlaceholders::new(sentinels));
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(sandbox.to_owned(), set.clone());
        Some(set)
    }
}

/// One sandbox's sentinels: matched in every wire form (to refuse them where they do not
/// belong) and as they are (to replace them).
pub struct SandboxPlaceholders {
    /// (credential, sentinel), in the order of the credentials.
    sentinels: Vec<(String, String)>,
    detect: Arc<SecretMatcher>,
}

impl std::fmt::Debug for SandboxPlaceholders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxPlaceholders")
            .field("credentials", &self.sentinels.len())
            .finish_non_exhaustive()
    }
}

impl SandboxPlaceholders {
    pub(crate) fn new(sentinels: Vec<(String, String)>) -> Self {
        let detect = Arc::new(SecretMatcher::new(
            sentinels.iter().map(|(c, s)| (c.as_str(), s.as_str())),
        ));
        Self { sentinels, detect }
    }

    /// The matcher over every form of every sentinel (named by credential).
    pub fn detector(&self) -> &Arc<SecretMatcher> {
        &self.detect
    }

    /// A matcher over the sentinels of the credentials `keep` accepts only.
    pub fn detector_for(&self, keep: impl Fn(&str) -> bool) -> Option<Arc<SecretMatcher>> {
        let pairs: Vec<(&str, &str)> = self
            .sentinels
            .iter()
            .filter(|(c, _)| keep(c))
            .map(|(c, s)| (c.as_str(), s.as_str()))
            .collect();
        (!pairs.is_empty()).then(|| Arc::new(SecretMatcher::new(pairs)))
    }

    /// The sentinel of `credential`.
    pub fn sentinel(&self, credential: &str) -> Option<&str> {
        self.sentinels
            .iter()
            .find(|(c, _)| c == credential)
            .map(|(_, s)| s.as_str())
    }
}

/// Replaces one sentinel with a value in a byte stream, occurrences split across pieces
/// included: the last `len - 1` bytes are held until the next piece or the end.
pub struct StreamReplacer {
    ac: AhoCorasick,
    needle_len: usize,
    with: zeroize::Zeroizing<Vec<u8>>,
    tail: Vec<u8>,
    count: u64,
}

impl StreamReplacer {
    /// Whether the sentinel occurs in `bytes` (a part of the request it is not replaced in).
    pub fn occurs_in(&self, bytes: &[u8]) -> bool {
        self.ac.is_match(bytes)
    }

    /// `None` only if the automaton cannot be built (never for a sentinel).
    pub fn new(needle: &str, with: zeroize::Zeroizing<Vec<u8>>) -> Option<Self> {
        if needle.is_empty() {
            return None;
        }
        let ac = AhoCorasick::new([needle]).ok()?;
        Some(Self {
            ac,
            needle_len: needle.len(),
            with,
            tail: Vec::new(),
            count: 0,
        })
    }

    /// Takes the next piece; returns what may be sent now.
    pub fn push(&mut self, piece: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(piece);
        let mut out = Vec::with_capacity(buf.len());
        let mut at = 0;
        for m in self.ac.find_iter(&buf) {
            out.extend_from_slice(&buf[at..m.start()]);
            out.extend_from_slice(&self.with);
            at = m.end();
            self.count += 1;
        }
        // A sentinel may start in the last `len - 1` bytes and end in the next piece.
        let keep_from = buf.len().saturating_sub(self.needle_len - 1).max(at);
        out.extend_from_slice(&buf[at..keep_from]);
        self.tail = buf[keep_from..].to_vec();
        out
    }

    /// The end of the stream: what was held.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.tail)
    }

    /// Sentinels replaced so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn sentinels_are_per_sandbox_and_credential_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Placeholders::new(vec!["api".into(), "other".into()]);
        a.load_key(dir.path()).unwrap();
        let s = a.sentinel("sb1", "api");
        assert!(s.starts_with(PREFIX) && s.len() == PREFIX.len() + 32, "{s}");
        assert_ne!(s, a.sentinel("sb2", "api"));
        assert_ne!(s, a.sentinel("sb1", "other"));
        // The same key file: the same sentinels.
        let mut b = Placeholders::new(vec!["api".into()]);
        b.load_key(dir.path()).unwrap();
        assert_eq!(s, b.sentinel("sb1", "api"));
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        // Another key: other sentinels.
        assert_ne!(
            s,
            Placeholders::new(vec!["api".into()]).sentinel("sb1", "api")
        );
        let set = b.for_sandbox("sb1").unwrap();
        assert_eq!(set.sentinel("api"), Some(s.as_str()));
        assert_eq!(set.detector().find(s.as_bytes()), Some("api"));
        assert!(Placeholders::new(Vec::new()).for_sandbox("sb1").is_none());
    }

    #[test]
    fn a_bad_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(KEY_FILE);
        std::fs::write(&key, b"short").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut p = Placeholders::new(vec!["api".into()]);
        assert!(p.load_key(dir.path()).is_err());
        // A key of the right length others can read (restored from a backup, say).
        std::fs::write(&key, [7u8; KEY_BYTES]).unwrap();
        assert!(p.load_key(dir.path()).is_ok(), "positive control");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = p.load_key(dir.path()).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn replacement_across_every_split() {
        let needle = "egress-placeholder-0123456789abcdef0123456789abcdef";
        let text = format!(
            "{{\"key\":\"{needle}\",\"again\":\"{needle}\"}} tail {}",
            &needle[..10]
        );
        let want = text.replace(needle, "REAL\"VALUE");
        for cut in 0..=text.len() {
            for cut2 in cut..=text.len() {
                let mut r =
                    StreamReplacer::new(needle, zeroize::Zeroizing::new(b"REAL\"VALUE".to_vec()))
                        .unwrap();
                let mut out = r.push(&text.as_bytes()[..cut]);
                out.extend(r.push(&text.as_bytes()[cut..cut2]));
                out.extend(r.push(&text.as_bytes()[cut2..]));
                out.extend(r.finish());
                assert_eq!(String::from_utf8(out).unwrap(), want, "cuts {cut} {cut2}");
                assert_eq!(r.count(), 2);
            }
        }
    }
}
