//! Legacy `${secrets.KEY}` placeholders inside string values.
//!
//! `${secrets.` opens a placeholder; it must be followed by a valid secret
//! key and `}`. Any other text, including `${other}` and `$secrets.x`, is left
//! as it is.

use std::fmt;

use crate::validate::{self, MAX_KEY_LEN};

const OPEN: &str = "${secrets.";

/// A piece of a parsed string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment<'a> {
    Literal(&'a str),
    Placeholder(&'a str),
}

/// Why a string's placeholder could not be parsed; `offset` is the byte
/// offset of its `${secrets.`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaceholderError {
    pub offset: usize,
    pub reason: String,
}

impl fmt::Display for PlaceholderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed placeholder at byte {}: {}", self.offset, self.reason)
    }
}

/// Splits `text` into literal text and placeholder keys.
pub fn parse(text: &str) -> Result<Vec<Segment<'_>>, PlaceholderError> {
    let mut segments = Vec::new();
    let mut rest = text;
    let mut consumed = 0;
    while let Some(start) = rest.find(OPEN) {
        if start > 0 {
            segments.push(Segment::Literal(&rest[..start]));
        }
        let after = &rest[start + OPEN.len()..];
        let offset = consumed + start;
        let Some(end) = after.find('}') else {
            return Err(PlaceholderError { offset, reason: "'${secrets.' has no closing '}'".into() });
        };
        let key = &after[..end];
        if let Err(v) = validate::secret_key("key", key) {
            let shown: String = key.chars().take(MAX_KEY_LEN.min(64)).collect();
            return Err(PlaceholderError { offset, reason: format!("key {shown:?} {}", v.description) });
        }
        segments.push(Segment::Placeholder(key));
        let used = start + OPEN.len() + end + 1;
        consumed += used;
        rest = &rest[used..];
    }
    if !rest.is_empty() {
        segments.push(Segment::Literal(rest));
    }
    Ok(segments)
}

/// The distinct keys the string refers to, in order of first use (linear in
/// the number of placeholders).
pub fn keys<'a>(segments: &[Segment<'a>]) -> Vec<&'a str> {
    let mut seen = std::collections::HashSet::new();
    segments
        .iter()
        .filter_map(|s| match s {
            Segment::Placeholder(k) if seen.insert(*k) => Some(*k),
            _ => None,
        })
        .collect()
}

/// How many placeholders the string has (repeats included).
pub fn count(segments: &[Segment<'_>]) -> usize {
    segments.iter().filter(|s| matches!(s, Segment::Placeholder(_))).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Segment::*;

    #[test]
    fn finds_several_placeholders_in_one_string() {
        let s = parse("jdbc:postgresql://${secrets.db_user}:${secrets.db.pass}@host/${secrets.db_user}").unwrap();
        assert_eq!(
            s,
            vec![
                Literal("jdbc:postgresql://"),
                Placeholder("db_user"),
                Literal(":"),
                Placeholder("db.pass"),
                Literal("@host/"),
                Placeholder("db_user"),
            ]
        );
        assert_eq!(keys(&s), vec!["db_user", "db.pass"]);
    }

    #[test]
    fn leaves_text_that_is_not_a_placeholder() {
        for text in ["plain", "${env:HOME}", "$secrets.x", "${secret.x}", "", "{secrets.x}"] {
            let s = parse(text).unwrap();
            assert!(keys(&s).is_empty(), "{text}");
            let joined: String = s
                .iter()
                .map(|x| match x {
                    Literal(l) => *l,
                    Placeholder(_) => "?",
                })
                .collect();
            assert_eq!(joined, text);
        }
    }

    #[test]
    fn malformed_placeholders_are_errors_with_an_offset() {
        let e = parse("abc ${secrets.unterminated").unwrap_err();
        assert_eq!(e.offset, 4);
        assert!(e.reason.contains("no closing"), "{}", e.reason);
        let e = parse("${secrets.}").unwrap_err();
        assert!(e.reason.contains("must not be empty"), "{}", e.reason);
        let e = parse("x${secrets.bad key}").unwrap_err();
        assert_eq!(e.offset, 1);
        assert!(e.reason.contains("contains ' '"), "{}", e.reason);
    }

    #[test]
    fn works_on_multibyte_text() {
        let s = parse("π=${secrets.pi}€").unwrap();
        assert_eq!(s, vec![Literal("π="), Placeholder("pi"), Literal("€")]);
    }
}
