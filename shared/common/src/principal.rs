//! Who a call acts as: `user:NAME` or `service:NAME`.

use std::{fmt, str::FromStr};

use crate::validate::FieldViolation;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectKind {
    User,
    Service,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Service => "service",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Principal {
    pub kind: SubjectKind,
    pub name: String,
}

pub const MAX_NAME_LEN: usize = 253;

impl Principal {
    pub fn user(name: impl Into<String>) -> Self {
        Self { kind: SubjectKind::User, name: name.into() }
    }

    pub fn service(name: impl Into<String>) -> Self {
        Self { kind: SubjectKind::Service, name: name.into() }
    }

    /// Parses a subject string, naming `field` in the error.
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldViolation> {
        let rule =
            "subjects are 'user:NAME' or 'service:NAME', NAME 1 to 253 of letters, digits, '@', '.', '_' and '-'";
        let (kind, name) =
            text.split_once(':').ok_or_else(|| FieldViolation::new(field, format!("{text:?} has no kind; {rule}")))?;
        let kind = match kind {
            "user" => SubjectKind::User,
            "service" => SubjectKind::Service,
            other => {
                return Err(FieldViolation::new(field, format!("unknown kind {other:?}; {rule}")));
            }
        };
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '_' | '-');
        if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok) {
            return Err(FieldViolation::new(field, format!("bad name {name:?}; {rule}")));
        }
        Ok(Self { kind, name: name.to_string() })
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.name)
    }
}

impl FromStr for Principal {
    type Err = FieldViolation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("subject", s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_users_and_services() {
        for s in ["user:alice", "service:spark-operator", "user:a.b@example.com"] {
            assert_eq!(Principal::parse("subject", s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_unknown_kinds_and_bad_names() {
        for s in ["alice", "group:x", "user:", "user:a b", "user:a:b"] {
            let e = Principal::parse("subject", s).unwrap_err();
            assert_eq!(e.field, "subject");
        }
    }
}
