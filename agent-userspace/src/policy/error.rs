//! Errors a policy file can produce. Each renders as one line that names the file, the
//! line and column when known, the field, and what would have been valid, because the
//! person reading it is editing a YAML file, not reading Rust.
use std::{fmt, path::PathBuf};

/// Largest policy accepted, in bytes of YAML.
pub const MAX_POLICY_BYTES: usize = 1 << 20;

/// Why a policy could not be loaded. A file with any error is rejected whole.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{}: cannot read the policy file: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The policy is larger than [`MAX_POLICY_BYTES`] (the same limit for `policy check`,
    /// `attach` and the daemon).
    #[error(
        "{origin}: the policy is {size} bytes; policies are limited to {max} bytes (1 MiB): \
         split the sandbox's rules or use wider patterns and CIDRs",
        max = MAX_POLICY_BYTES
    )]
    TooLarge { origin: String, size: usize },
    /// The file is not valid YAML, or does not have the shape of a policy (unknown key,
    /// wrong type, malformed address, port or connection).
    #[error("{origin}:{line}:{column}: {}{message}", field_prefix(field))]
    Parse {
        /// File name (or other origin) as given to `parse_str`.
        origin: String,
        /// 1-based.
        line: usize,
        /// 1-based.
        column: usize,
        /// Path of the offending value, e.g. `rules[0].ports[1]`; empty for the document.
        field: String,
        message: String,
    },
    /// The file parsed but breaks a rule that needs more than one value to check
    /// (duplicate names, unknown test rule, too many rules, kernel limits, ...).
    #[error(
        "{origin}{}: {}{message}",
        location_suffix(location),
        field_prefix(field)
    )]
    Invalid {
        origin: String,
        /// Path of the offending value, e.g. `rules[2].to[0]`.
        field: String,
        message: String,
        /// Where that value starts in the file, when it could be found.
        location: Option<Location>,
    },
}

/// A 1-based position in a policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() || field == "." {
        String::new()
    } else {
        format!("{field}: ")
    }
}

fn location_suffix(location: &Option<Location>) -> String {
    location.map(|l| format!(":{l}")).unwrap_or_default()
}

/// One step in the path to a value of the policy document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Key(&'static str),
    Index(usize),
}

/// Path to a value of the policy document, rendered like `rules[2].to[0]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<Segment>);

impl FieldPath {
    /// The document itself.
    pub fn root() -> Self {
        Self::default()
    }

    /// This path extended by a mapping key.
    pub fn key(&self, key: &'static str) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Key(key));
        next
    }

    /// This path extended by a sequence index.
    pub fn index(&self, index: usize) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A check of `compile()` failed. `load_file`/`parse_str` turn it into
/// [`PolicyError::Invalid`] with the file name and position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field_prefix(&field.to_string()))]
pub struct CompileError {
    /// The value at fault.
    pub field: FieldPath,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl CompileError {
    pub(crate) fn new(field: FieldPath, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}
