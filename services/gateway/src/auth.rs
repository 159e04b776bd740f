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
    /// Service tokens: the RPC groups it may call. Unset: `resolve` and
    /// `workloads` only. (User tokens call anything; their own permissions
    /// decide.)
    #[serde(default)]
    pub allow: Option<Vec<RpcGroup>>,
    /// Service tokens: whom it may act for (`x-on-behalf-of`): subjects or
    /// `user:*` / `service:*` / `*`. Unset: `user:*`. Acting as itself is
    /// always allowed.
    #[serde(default)]
    pub act_for: Option<Vec<String>>,
    /// Service tokens: whether it may act for a platform admin. Unset: no.
    #[serde(default)]
    pub act_for_admins: bool,
}

/// What a service token may call, by group of RPCs.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RpcGroup {
    /// `ResolveSecrets`.
    Resolve,
    /// Reading what a workload may use: the secret selector, `Check`, `BatchCheck`.
    Workloads,
    /// `SecretService` and `VaultConfigService`.
    ManageSecrets,
    /// Domain members and permissions, groups, bundles and their grants.
    ManageAccess,
    /// Platform admins.
    Admin,
}

impl RpcGroup {
    pub fn name(self) -> &'static str {
        match self {
            Self::Resolve => "resolve",
            Self::Workloads => "workloads",
            Self::ManageSecrets => "manage_secrets",
            Self::ManageAccess => "manage_access",
            Self::Admin => "admin",
        }
    }
}

/// A subject pattern of `act_for`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Any,
    Kind(String),
    Exact(Principal),
}

impl Pattern {
    fn parse(field: &str, text: &str) -> Result<Self, FieldViolation> {
        match text {
            "*" => Ok(Self::Any),
            "user:*" | "service:*" => Ok(Self::Kind(text.trim_end_matches(":*").to_string())),
            _ => Principal::parse(field, text).map(Self::Exact).map_err(|_| {
                FieldViolation::new(
                    field,
                    format!("{text:?} is not a pattern: use user:NAME, service:NAME, user:*, service:* or *"),
                )
            }),
        }
    }

    fn matches(&self, p: &Principal) -> bool {
        match self {
            Self::Any => true,
            Self::Kind(kind) => p.kind.as_str() == kind,
            Self::Exact(e) => e == p,
        }
    }
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
    /// The RPC groups the token may call; `None`: all (user tokens).
    pub groups: Option<Arc<BTreeSet<RpcGroup>>>,
    /// A service token acting for someone else that may not act for a
    /// platform admin: the gateway checks the principal is none.
    pub must_not_be_admin: bool,
}

impl Caller {
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the call was not authenticated"))
    }

    /// PERMISSION_DENIED unless the token may call `group`'s RPCs.
    pub fn require(&self, group: RpcGroup, rpc: &str) -> Result<(), Status> {
        match &self.groups {
            Some(groups) if !groups.contains(&group) => Err(Status::permission_denied(format!(
                "token {:?} may not call {rpc}: it is in group {} and the token allows {}",
                self.name,
                group.name(),
                groups.iter().map(|g| g.name()).collect::<Vec<_>>().join(", ")
            ))),
            _ => Ok(()),
        }
    }

    /// The refusal for a principal that turned out to be a platform admin.
    pub fn admin_refusal(&self) -> Status {
        Status::permission_denied(format!(
            "token {:?} may not act for {}, a platform admin (set act_for_admins for this token to allow it)",
            self.name, self.principal
        ))
    }
}

struct Entry {
    name: String,
    kind: TokenKind,
    subject: String,
    hash: TokenHash,
    groups: Option<Arc<BTreeSet<RpcGroup>>>,
    act_for: Vec<Pattern>,
    act_for_admins: bool,
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
            let (groups, act_for) = match t.kind {
                TokenKind::User => (None, Vec::new()),
                TokenKind::Service => {
                    let groups = t.allow.clone().unwrap_or_else(|| vec![RpcGroup::Resolve, RpcGroup::Workloads]);
                    let patterns = t.act_for.clone().unwrap_or_else(|| vec!["user:*".to_string()]);
                    let act_for = patterns
                        .iter()
                        .enumerate()
                        .map(|(j, p)| Pattern::parse(&field(&format!("act_for[{j}]")), p))
                        .collect::<Result<Vec<_>, _>>()?;
                    (Some(Arc::new(groups.into_iter().collect())), act_for)
                }
            };
            entries.push(Entry {
                name: t.name.clone(),
                kind: t.kind,
                subject: t.subject.clone(),
                hash,
                groups,
                act_for,
                act_for_admins: t.act_for_admins,
            });
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
        let own = match entry.kind {
            TokenKind::User => Principal::user(&entry.subject),
            TokenKind::Service => Principal::service(&entry.subject),
        };
        let principal = match (entry.kind, on_behalf_of) {
            (_, None) => own.clone(),
            (TokenKind::User, Some(_)) => {
                return Err(Status::permission_denied(format!(
                    "token {:?} is a user token; only platform-service tokens may act on behalf of another principal ({ON_BEHALF_OF})",
                    entry.name
                )));
            }
            (TokenKind::Service, Some(p)) if p == own || entry.act_for.iter().any(|pattern| pattern.matches(&p)) => p,
            (TokenKind::Service, Some(p)) => {
                return Err(Status::permission_denied(format!(
                    "token {:?} may not act for {p}: its act_for does not allow it",
                    entry.name
                )));
            }
        };
        let must_not_be_admin = entry.kind == TokenKind::Service && principal != own && !entry.act_for_admins;
        request.extensions_mut().insert(Caller {
            name: entry.name.clone(),
            kind: entry.kind,
            principal,
            groups: entry.groups.clone(),
            must_not_be_admin,
        });
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
                allow: None,
                act_for: None,
                act_for_admins: false,
            },
            TokenConfig {
                name: "spark".into(),
                kind: TokenKind::Service,
                subject: "spark".into(),
                sha256: TokenHash::of("t-spark").to_hex(),
                allow: None,
                act_for: None,
                act_for_admins: false,
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
    fn service_tokens_act_for_users_only_and_call_resolve_and_workloads_by_default() {
        let c = call(Some("t-spark"), Some("user:bob")).unwrap();
        assert!(c.must_not_be_admin, "acting for someone else: never as a platform admin unless allowed");
        assert!(c.require(RpcGroup::Resolve, "ResolveSecrets").is_ok());
        assert!(c.require(RpcGroup::Workloads, "Check").is_ok());
        let err = c.require(RpcGroup::Admin, "GrantPlatformAdmin").unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("allows resolve, workloads"), "{}", err.message());
        let err = call(Some("t-spark"), Some("service:other")).unwrap_err();
        assert!(err.message().contains("may not act for service:other"), "{}", err.message());
        assert!(!call(Some("t-spark"), None).unwrap().must_not_be_admin, "acting as itself");
        let user = call(Some("t-alice"), None).unwrap();
        assert!(user.require(RpcGroup::Admin, "GrantPlatformAdmin").is_ok(), "users: their permissions decide");
    }

    #[test]
    fn act_for_patterns_are_checked_at_start_up() {
        let e = Authenticator::new(&[TokenConfig {
            name: "x".into(),
            kind: TokenKind::Service,
            subject: "x".into(),
            sha256: TokenHash::of("t").to_hex(),
            allow: None,
            act_for: Some(vec!["user:*".into(), "team:*".into()]),
            act_for_admins: false,
        }])
        .err()
        .unwrap();
        assert_eq!(e.field, "tokens[0].act_for[1]");
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
            allow: None,
            act_for: None,
            act_for_admins: false,
        }])
        .err()
        .unwrap();
        assert_eq!(e.field, "tokens[0].sha256");
    }
}
