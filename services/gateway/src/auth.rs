//! Authenticates every call to the gateway with a bearer token from the
//! configuration (stored as SHA-256 hashes, compared in constant time).

use std::{collections::BTreeSet, sync::Arc};

use secrets_common::{
    Principal,
    auth::{ON_BEHALF_OF, TokenHash, bearer},
    error::invalid_argument,
    validate::FieldViolation,
};
use serde::Deserialize;
use tonic::{Request, Status, service::Interceptor};

/// One accepted token, as written in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Names the caller in logs and audit, never the token itself.
    pub name: String,
    pub kind: TokenKind,
    /// The user a user token acts as, or the platform service's name.
    pub subject: String,
    /// Hex SHA-256 of the token (`gateway hash-token` prints it).
    pub sha256: String,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// A person: acts as `user:SUBJECT`; never receives secret values.
    User,
    /// A platform component: acts for the principal in `x-on-behalf-of`
    /// (or as `service:SUBJECT`), and may receive resolved values.
    Service,
}

/// Who is calling, as established by [`Authenticator`].
#[derive(Clone, Debug)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    pub kind: TokenKind,
    /// Whom the call acts for.
    pub principal: Principal,
}

impl Caller {
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the call was not authenticated"))
    }
}

struct Entry {
    name: String,
    kind: TokenKind,
    subject: String,
    hash: TokenHash,
}

#[derive(Clone)]
pub struct Authenticator {
    entries: Arc<Vec<Entry>>,
}

impl Authenticator {
    /// Checks the configured tokens; errors name the entry and the field.
    pub fn new(tokens: &[TokenConfig]) -> Result<Self, FieldViolation> {
        let mut names = BTreeSet::new();
        let mut entries = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let field = |f: &str| format!("tokens[{i}].{f}");
            if t.name.is_empty() || !names.insert(t.name.clone()) {
                return Err(FieldViolation::new(field("name"), "must be non-empty and unique"));
            }
            let principal = match t.kind {
                TokenKind::User => Principal::user(&t.subject),
                TokenKind::Service => Principal::service(&t.subject),
            };
            Principal::parse(&field("subject"), &principal.to_string())?;
            let hash = TokenHash::from_hex(&t.sha256).map_err(|e| FieldViolation::new(field("sha256"), e))?;
            entries.push(Entry { name: t.name.clone(), kind: t.kind, subject: t.subject.clone(), hash });
        }
        Ok(Self { entries: Arc::new(entries) })
    }

    fn find(&self, token: &str) -> Option<&Entry> {
        let presented = TokenHash::of(token);
        // Compare against every entry so timing does not tell which matched.
        let mut found = None;
        for e in self.entries.iter() {
            if e.hash.matches(&presented) && found.is_none() {
                found = Some(e);
            }
        }
        found
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = bearer(request.metadata())
            .ok_or_else(|| Status::unauthenticated("missing credentials: send `authorization: Bearer <token>`"))?;
        let entry = self.find(token).ok_or_else(|| Status::unauthenticated("unknown or revoked token"))?;
        let on_behalf_of = match request.metadata().get(ON_BEHALF_OF) {
            None => None,
            Some(v) => {
                let text =
                    v.to_str().map_err(|_| invalid_argument(FieldViolation::new(ON_BEHALF_OF, "must be ASCII")))?;
                Some(Principal::parse(ON_BEHALF_OF, text).map_err(invalid_argument)?)
            }
        };
        let principal = match (entry.kind, on_behalf_of) {
            (TokenKind::User, None) => Principal::user(&entry.subject),
            (TokenKind::User, Some(_)) => {
                return Err(Status::permission_denied(format!(
                    "token {:?} is a user token; only platform-service tokens may act on behalf of another principal ({ON_BEHALF_OF})",
                    entry.name
                )));
            }
            (TokenKind::Service, Some(p)) => p,
            (TokenKind::Service, None) => Principal::service(&entry.subject),
        };
        request.extensions_mut().insert(Caller { name: entry.name.clone(), kind: entry.kind, principal });
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn authenticator() -> Authenticator {
        Authenticator::new(&[
            TokenConfig {
                name: "alice".into(),
                kind: TokenKind::User,
                subject: "alice".into(),
                sha256: TokenHash::of("t-alice").to_hex(),
            },
            TokenConfig {
                name: "spark".into(),
                kind: TokenKind::Service,
                subject: "spark".into(),
                sha256: TokenHash::of("t-spark").to_hex(),
            },
        ])
        .unwrap()
    }

    fn call(token: Option<&str>, on_behalf_of: Option<&str>) -> Result<Caller, Status> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        if let Some(p) = on_behalf_of {
            r.metadata_mut().insert(ON_BEHALF_OF, p.parse().unwrap());
        }
        let r = authenticator().call(r)?;
        Caller::of(&r)
    }

    #[test]
    fn user_tokens_act_as_their_user() {
        let c = call(Some("t-alice"), None).unwrap();
        assert_eq!(c.principal, Principal::user("alice"));
        assert_eq!(c.kind, TokenKind::User);
    }

    #[test]
    fn service_tokens_act_for_the_named_principal_or_themselves() {
        assert_eq!(call(Some("t-spark"), Some("user:bob")).unwrap().principal, Principal::user("bob"));
        assert_eq!(call(Some("t-spark"), None).unwrap().principal, Principal::service("spark"));
    }

    #[test]
    fn bad_credentials_and_metadata_are_refused() {
        assert_eq!(call(None, None).unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(call(Some("wrong"), None).unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(call(Some("t-alice"), Some("user:bob")).unwrap_err().code(), Code::PermissionDenied);
        let bad = call(Some("t-spark"), Some("bob")).unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert!(bad.message().contains(ON_BEHALF_OF), "{}", bad.message());
    }

    #[test]
    fn configuration_errors_name_the_entry() {
        let e = Authenticator::new(&[TokenConfig {
            name: "x".into(),
            kind: TokenKind::User,
            subject: "x".into(),
            sha256: "zz".into(),
        }])
        .err()
        .unwrap();
        assert_eq!(e.field, "tokens[0].sha256");
    }
}
