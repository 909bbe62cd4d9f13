//! Reading a policy file: YAML -> [`RawPolicy`] -> [`compile`], with every error turned
//! into a [`PolicyError`] that names the file, line, column and field.
use std::{fmt, path::Path};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{
    compile::{compile, Policy},
    error::{FieldPath, Location, PolicyError, Segment, MAX_POLICY_BYTES},
    raw::RawPolicy,
    selftest::TestOutcome,
};

/// Reads, parses and compiles a policy file. Messages name the file as `path` is written.
pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
    let src = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_str(&src, &path.display().to_string())
}

/// [`load_file`] without running the policy's tests (see [`parse_untested`]).
pub fn load_file_untested(path: &Path) -> Result<Policy, PolicyError> {
    let src = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_untested(&src, &path.display().to_string())
}

/// Parses and compiles a policy and runs its own `tests:`; `origin` stands for the file
/// name in messages. A policy whose tests fail does not load: it does not mean what its
/// author checked it means (the daemon refuses it at attach, as `policy check` does), and
/// the error names the first failing test's line.
pub fn parse_str(src: &str, origin: &str) -> Result<Policy, PolicyError> {
    let policy = parse_untested(src, origin)?;
    let outcomes = policy.run_tests();
    let failed: Vec<(usize, &TestOutcome)> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.passed)
        .collect();
    let Some(&(first, outcome)) = failed.first() else {
        return Ok(policy);
    };
    let field = FieldPath::root().key("tests").index(first);
    let more = match failed.len() {
        1 => String::new(),
        n => format!(" ({} more of its {} tests fail too)", n - 1, outcomes.len()),
    };
    Err(PolicyError::Invalid {
        origin: origin.to_owned(),
        location: locate(src, &field),
        field: field.to_string(),
        message: format!(
            "the policy's own test fails, so the policy does not mean what it says: \
             {outcome}{more} (valid: a policy whose every test passes; `egressctl policy \
             test FILE` shows each outcome)"
        ),
    })
}

/// [`parse_str`] without running the policy's tests: for `egressctl policy test`, which
/// reports every outcome itself.
pub fn parse_untested(src: &str, origin: &str) -> Result<Policy, PolicyError> {
    if src.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge {
            origin: origin.to_owned(),
            size: src.len(),
        });
    }
    let raw = parse_raw(src, origin)?;
    compile(&raw).map_err(|e| PolicyError::Invalid {
        origin: origin.to_owned(),
        location: locate(src, &e.field),
        field: e.field.to_string(),
        message: e.message,
    })
}

/// Parses a policy without compiling it (for tools that inspect or rewrite files).
pub fn parse_raw(src: &str, origin: &str) -> Result<RawPolicy, PolicyError> {
    // serde_yaml_ng reads an empty document as an empty mapping, which would be reported
    // as a missing `version`; say what is actually wrong.
    let blank = src
        .lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#') || l == "---" || l == "...");
    if blank {
        return Err(PolicyError::Parse {
            origin: origin.to_owned(),
            line: 1,
            column: 1,
            field: String::new(),
            message: EMPTY.to_owned(),
        });
    }
    let de = serde_yaml_ng::Deserializer::from_str(src);
    serde_path_to_error::deserialize::<_, RawPolicy>(de).map_err(|e| {
        let mut field = e.path().to_string();
        // `?` stands for a key not read yet, as at a YAML syntax error.
        while let Some(parent) = field.strip_suffix(".?").or(field.strip_suffix('?')) {
            field = parent.to_owned();
        }
        if field == "." {
            field.clear();
        }
        let inner = e.into_inner();
        let location = inner.location();
        let message = bare_message(&inner.to_string(), &field);
        let message = match message.as_str() {
            "EOF while parsing a value" => EMPTY.to_owned(),
            // libyaml's messages end in the construct it was reading.
            m if m.contains(", while parsing ") || m.contains(", while scanning ") => {
                format!("{m} (not valid YAML: check indentation, quotes and brackets)")
            }
            _ => message,
        };
        PolicyError::Parse {
            origin: origin.to_owned(),
            line: location.as_ref().map_or(1, |l| l.line()),
            column: location.as_ref().map_or(1, |l| l.column()),
            field,
            message,
        }
    })
}

const EMPTY: &str = "the policy is empty (valid: a mapping with at least `version: 1`)";

/// serde_yaml_ng renders errors as `[path: ]message[ at line L column C]`; the path and
/// position are reported separately, so strip them.
fn bare_message(rendered: &str, field: &str) -> String {
    let mut text = rendered;
    // serde_yaml_ng's own path is the p2e path or one of its ancestors (for an unknown
    // key it names the mapping, for a top-level problem the document, `.`).
    if let Some((head, rest)) = text.split_once(": ") {
        let ancestor = head == "."
            || field == head
            || field
                .strip_prefix(head)
                .is_some_and(|tail| tail.starts_with('.') || tail.starts_with('['));
        if ancestor && !head.contains(char::is_whitespace) {
            text = rest;
        }
    }
    crate::text::strip_positions(text)
}

/// Finds where the value at `path` starts, by walking the document again and failing on
/// purpose when the walk reaches it: serde_yaml_ng stamps the failure with the value's
/// position. `None` if the path is not in the document.
pub(crate) fn locate(src: &str, path: &FieldPath) -> Option<Location> {
    let de = serde_yaml_ng::Deserializer::from_str(src);
    let err = Find(path.segments()).deserialize(de).err()?;
    if err.to_string().contains(FOUND) {
        err.location().map(|l| Location {
            line: l.line(),
            column: l.column(),
        })
    } else {
        None
    }
}

const FOUND: &str = "egress-policy-locate-found";

struct Find<'a>(&'a [Segment]);

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Find<'_> {
    fn here<E: de::Error>(&self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Find<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.here()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.here()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.here()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.here()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.here()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.here()?;
        let Some((Segment::Index(want), rest)) = self.0.split_first() else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut index = 0;
        loop {
            let found = if index == *want {
                seq.next_element_seed(Find(rest))?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| ())
            };
            if found.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.here()?;
        let Some((Segment::Key(want), rest)) = self.0.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        while let Some(key) = map.next_key::<KeyText>()? {
            if key.0.as_deref() == Some(*want) {
                map.next_value_seed(Find(rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A mapping key, if it is a string.
struct KeyText(Option<String>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
        }
        d.deserialize_any(V)
    }
}
