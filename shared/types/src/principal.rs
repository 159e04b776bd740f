//! Who a call acts as (`user:NAME` or `service:NAME`), and the subjects
//! grants name, which may be groups too (`group:NAME`).

use std::{fmt, str::FromStr};

use crate::validate::FieldViolation;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectKind {
    User,
    Service,
    /// Never acts: a name that grants, owners and memberships may use.
    Group,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Service => "service",
            Self::Group => "group",
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

    pub fn group(name: impl Into<String>) -> Self {
        Self { kind: SubjectKind::Group, name: name.into() }
    }

    pub fn is_group(&self) -> bool {
        self.kind == SubjectKind::Group
    }

    /// Parses who a call acts as: `user:NAME` or `service:NAME`, naming
    /// `field` in the error. Groups never act.
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldViolation> {
        Self::parse_kinds(
            field,
            text,
            &[SubjectKind::User, SubjectKind::Service],
            "subjects are 'user:NAME' or 'service:NAME', NAME 1 to 253 of letters, digits, '@', '.', '_', '-' and '/' (between non-empty parts)",
        )
    }

    /// Parses a subject a grant, an owner or a membership may name: a user,
    /// a service or a group.
    pub fn parse_subject(field: &str, text: &str) -> Result<Self, FieldViolation> {
        Self::parse_kinds(
            field,
            text,
            &[SubjectKind::User, SubjectKind::Service, SubjectKind::Group],
            "subjects are 'user:NAME', 'service:NAME' or 'group:NAME', NAME 1 to 253 of letters, digits, '@', '.', '_', '-' and '/' (between non-empty parts)",
        )
    }

    fn parse_kinds(field: &str, text: &str, kinds: &[SubjectKind], rule: &str) -> Result<Self, FieldViolation> {
        let (kind, name) = text.split_once(':').ok_or_else(|| {
            FieldViolation::new(field, format!("{} has no kind; {rule}", crate::validate::echo(text)))
        })?;
        let kind = match kinds.iter().find(|k| k.as_str() == kind) {
            Some(k) => *k,
            None => return Err(FieldViolation::new(field, format!("{kind:?} is not allowed here; {rule}"))),
        };
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '_' | '-' | '/');
        // '/' separates an identity provider's namespace: `keycloak/alice`.
        let segments_ok = name.split('/').all(|s| !s.is_empty());
        if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok) || !segments_ok {
            return Err(FieldViolation::new(field, format!("bad name {}; {rule}", crate::validate::echo(name))));
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
        for s in ["user:alice", "service:spark-operator", "user:a.b@example.com", "user:keycloak/3f2a-41"] {
            assert_eq!(Principal::parse("subject", s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn groups_are_subjects_but_never_act() {
        assert_eq!(Principal::parse_subject("owner", "group:data-eng").unwrap(), Principal::group("data-eng"));
        let e = Principal::parse("x-on-behalf-of", "group:data-eng").unwrap_err();
        assert!(e.description.contains("\"group\" is not allowed here"), "{}", e.description);
        assert!(Principal::parse_subject("owner", "team:x").is_err());
    }

    #[test]
    fn rejects_unknown_kinds_and_bad_names() {
        for s in ["alice", "group:x", "user:", "user:a b", "user:a:b", "user:/a", "user:a/", "user:a//b"] {
            let e = Principal::parse("subject", s).unwrap_err();
            assert_eq!(e.field, "subject");
        }
    }
}
