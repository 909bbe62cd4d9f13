//! [`Secret`]: a credential value that cannot be printed by accident.

use std::fmt;

use zeroize::Zeroizing;

/// A secret value (token, password). `Debug` and `Display` print `Secret(<redacted>)`;
/// the only way to the value is [`Secret::expose`], which is greppable. The memory
/// holding the value is zeroed when the last copy is dropped (copies made from
/// [`Secret::expose`], such as a built header value, are not).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps `value`, taking ownership so that no un-zeroed copy is left behind.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The value itself. Call only to build what goes to the upstream server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
