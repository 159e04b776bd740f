//! Authenticates every call to the gateway: a bearer token from the
//! configuration (stored as SHA-256 hashes, compared in constant time), or a
//! JWT from a trusted issuer ([`crate::jwt`]): users from the identity
//! provider, platform services by their Kubernetes service account.

use std::{collections::BTreeSet, sync::Arc};

use secrets_common::{
    Principal,
    auth::{ON_BEHALF_OF, TokenHash},
    authz::{Decisions, Question},
    error::invalid_argument,
    validate::FieldViolation,
};
use secrets_proto::v1::{CheckResponse, Permission};
use serde::Deserialize;
use tonic::{Request, Status};

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

/// A Kubernetes service account that may call as a platform service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountConfig {
    /// `system:serviceaccount:NAMESPACE:NAME`, the token's `sub`.
    pub service_account: String,
    /// The platform service's name: it acts as `service:SUBJECT`.
    pub subject: String,
    /// As for service tokens: unset, `resolve` and `workloads` only.
    #[serde(default)]
    pub allow: Option<Vec<RpcGroup>>,
    /// As for service tokens: unset, `user:*`.
    #[serde(default)]
    pub act_for: Option<Vec<String>>,
    #[serde(default)]
    pub act_for_admins: bool,
}

/// What a service token may call, by group of RPCs.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RpcGroup {
    /// `ResolveSecrets` and `ResolveWorkload`: values.
    Resolve,
    /// Workloads without values: the secret selector, `Check`, `BatchCheck`,
    /// `SaveWorkload` (validation and the usage index), `DeleteWorkload`,
    /// `GetWorkloadReferences`, `ListSecretUsages`.
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
                    format!(
                        "{} is not a pattern: use user:NAME, service:NAME, user:*, service:* or *",
                        secrets_common::validate::echo(text)
                    ),
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
    /// Whom the token itself proves: the platform service
    /// (`service:compute-manager`) or the user, whomever it acts for.
    pub own: Principal,
    /// The groups the identity provider puts the principal in (a user
    /// token's groups claim); they count like recorded memberships.
    pub member_of: Vec<Principal>,
    /// The RPC groups the token may call; `None`: all (user tokens).
    pub groups: Option<Arc<BTreeSet<RpcGroup>>>,
    /// Set when the principal must not turn out to be a platform admin:
    /// every [`Caller::decide`] checks it in the same round trip.
    pub not_admin: Option<NotAdmin>,
}

/// Why a caller's principal may not be a platform admin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotAdmin {
    /// A service token acting for someone else without `act_for_admins`.
    Delegated,
    /// A user of this issuer, which shares the plain namespace.
    SharedIssuer(String),
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

    /// Answers `questions` about the principal in one authz round trip
    /// (none when there is nothing to ask), in their order. For a caller
    /// that may not act for a platform admin, the same round trip asks
    /// whether the principal is one, and refuses the call if so: the one
    /// place that restriction is kept.
    pub async fn decide(
        &self,
        authz: &dyn Decisions,
        questions: Vec<Question<'_>>,
    ) -> Result<Vec<CheckResponse>, Status> {
        let asked = questions.len();
        let probe = self
            .not_admin
            .as_ref()
            .map(|_| Question::domain(&self.principal, Permission::PlatformAdmin, None).with_groups(&self.member_of));
        let all: Vec<Question<'_>> = questions.into_iter().chain(probe).collect();
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let mut answers = authz.batch_check(&all).await?;
        if answers.len() != all.len() {
            return Err(Status::unavailable("authz-service: answered fewer questions than asked"));
        }
        // The caller's questions first, then the probe's answer, if asked.
        let probed = answers.split_off(asked);
        if let (Some(why), Some(answer)) = (&self.not_admin, probed.first())
            && answer.allowed
        {
            return Err(self.admin_refusal(why));
        }
        Ok(answers)
    }

    /// The refusal for a principal that turned out to be a platform admin.
    fn admin_refusal(&self, why: &NotAdmin) -> Status {
        if let NotAdmin::SharedIssuer(issuer) = why {
            return Status::permission_denied(format!(
                "{} comes from issuer {issuer}, which shares the plain namespace, and may not act as a platform admin; name identity-provider admins user:{issuer}/NAME (an issuer without shared_namespace)",
                self.principal
            ));
        }
        Status::permission_denied(format!(
            "token {:?} may not act for {}, a platform admin (set act_for_admins for this token to allow it)",
            self.name, self.principal
        ))
    }
}

/// What a platform-service identity may do.
struct Policy {
    groups: Arc<BTreeSet<RpcGroup>>,
    act_for: Vec<Pattern>,
    act_for_admins: bool,
}

impl Policy {
    fn new(
        allow: &Option<Vec<RpcGroup>>,
        act_for: &Option<Vec<String>>,
        act_for_admins: bool,
        field: impl Fn(&str) -> String,
    ) -> Result<Self, FieldViolation> {
        let groups = allow.clone().unwrap_or_else(|| vec![RpcGroup::Resolve, RpcGroup::Workloads]);
        let patterns = act_for.clone().unwrap_or_else(|| vec!["user:*".to_string()]);
        let act_for = patterns
            .iter()
            .enumerate()
            .map(|(j, p)| Pattern::parse(&field(&format!("act_for[{j}]")), p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { groups: Arc::new(groups.into_iter().collect()), act_for, act_for_admins })
    }
}

/// One identity a call can prove: whom it acts as, and for services, what
/// it may do.
struct Identity {
    /// Names the caller in logs and audit.
    name: String,
    kind: TokenKind,
    own: Principal,
    policy: Option<Policy>,
}

struct Entry {
    identity: Identity,
    hash: TokenHash,
}

#[derive(Clone)]
pub struct Authenticator {
    entries: Arc<Vec<Entry>>,
    /// By `system:serviceaccount:NS:NAME`.
    service_accounts: Arc<std::collections::HashMap<String, Identity>>,
    jwt: crate::jwt::Verifier,
    /// Whom static tokens act as: no JWT user may become one.
    static_principals: Arc<BTreeSet<Principal>>,
}

impl Authenticator {
    /// Static tokens only (tests and local runs).
    pub fn new(tokens: &[TokenConfig]) -> Result<Self, FieldViolation> {
        Self::with_jwt(tokens, &[], &[])
    }

    /// Checks the configured tokens, service accounts and issuers; errors
    /// name the entry and the field.
    pub fn with_jwt(
        tokens: &[TokenConfig],
        service_accounts: &[ServiceAccountConfig],
        issuers: &[crate::jwt::IssuerConfig],
    ) -> Result<Self, FieldViolation> {
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
            reserved_namespace(&field("subject"), &t.subject)?;
            let hash = TokenHash::from_hex(&t.sha256).map_err(|e| FieldViolation::new(field("sha256"), e))?;
            let policy = match t.kind {
                TokenKind::User => None,
                TokenKind::Service => Some(Policy::new(&t.allow, &t.act_for, t.act_for_admins, field)?),
            };
            entries.push(Entry {
                identity: Identity { name: t.name.clone(), kind: t.kind, own: principal, policy },
                hash,
            });
        }
        let mut accounts = std::collections::HashMap::new();
        for (i, a) in service_accounts.iter().enumerate() {
            let field = |f: &str| format!("service_accounts[{i}].{f}");
            let parts: Vec<&str> = a.service_account.split(':').collect();
            if parts.len() != 4
                || parts[..2] != ["system", "serviceaccount"]
                || parts[2].is_empty()
                || parts[3].is_empty()
            {
                return Err(FieldViolation::new(
                    field("service_account"),
                    "must be system:serviceaccount:NAMESPACE:NAME",
                ));
            }
            let own = Principal::parse(&field("subject"), &Principal::service(&a.subject).to_string())?;
            reserved_namespace(&field("subject"), &a.subject)?;
            let policy = Policy::new(&a.allow, &a.act_for, a.act_for_admins, field)?;
            let identity =
                Identity { name: a.service_account.clone(), kind: TokenKind::Service, own, policy: Some(policy) };
            if accounts.insert(a.service_account.clone(), identity).is_some() {
                return Err(FieldViolation::new(field("service_account"), "is listed twice"));
            }
        }
        let jwt = crate::jwt::Verifier::new(issuers).map_err(|e| FieldViolation::new("jwt_issuers", e))?;
        let static_principals = entries.iter().map(|e| e.identity.own.clone()).collect();
        Ok(Self {
            entries: Arc::new(entries),
            service_accounts: Arc::new(accounts),
            jwt,
            static_principals: Arc::new(static_principals),
        })
    }

    fn find(&self, token: &str) -> Option<&Identity> {
        let presented = TokenHash::of(token);
        // Compare against every entry so timing does not tell which matched.
        let mut found = None;
        for e in self.entries.iter() {
            if e.hash.matches(&presented) && found.is_none() {
                found = Some(e);
            }
        }
        found.map(|e| &e.identity)
    }

    /// Establishes who is calling from the call's headers.
    pub async fn authenticate(&self, headers: &http::HeaderMap) -> Result<Caller, Status> {
        let token = header_bearer(headers)
            .ok_or_else(|| Status::unauthenticated("missing credentials: send `authorization: Bearer <token>`"))?;
        let on_behalf_of = match headers.get(ON_BEHALF_OF) {
            None => None,
            Some(v) => {
                let text =
                    v.to_str().map_err(|_| invalid_argument(FieldViolation::new(ON_BEHALF_OF, "must be ASCII")))?;
                Some(Principal::parse(ON_BEHALF_OF, text).map_err(invalid_argument)?)
            }
        };
        if !self.jwt.is_empty() && crate::jwt::looks_like_jwt(token) {
            let verified = self.jwt.verify(token).await.map_err(refused)?;
            return match verified.kind {
                crate::jwt::IssuerKind::Users => {
                    let own = Principal::parse("token user claim", &Principal::user(&verified.subject).to_string())
                        .map_err(|v| refused(format!("issuer {}: the user name {}", verified.issuer, v.description)))?;
                    if self.static_principals.contains(&own) {
                        return Err(refused(format!(
                            "issuer {}: {own} is the principal of a static token, which no identity-provider user may become",
                            verified.issuer
                        )));
                    }
                    let member_of = verified
                        .groups
                        .iter()
                        .filter_map(|g| Principal::parse_subject("groups", &format!("group:{g}")).ok())
                        .collect();
                    let identity = Identity {
                        name: format!("{}/{}", verified.issuer, verified.subject),
                        kind: TokenKind::User,
                        own,
                        policy: None,
                    };
                    let mut caller = caller(&identity, on_behalf_of, member_of)?;
                    if verified.shared {
                        caller.not_admin = Some(NotAdmin::SharedIssuer(verified.issuer.clone()));
                    }
                    Ok(caller)
                }
                crate::jwt::IssuerKind::ServiceAccounts => {
                    let identity = self.service_accounts.get(&verified.subject).ok_or_else(|| {
                        Status::permission_denied(format!(
                            "service account {} is not a platform service here (not in service_accounts)",
                            verified.subject
                        ))
                    })?;
                    caller(identity, on_behalf_of, Vec::new())
                }
            };
        }
        let identity = self.find(token).ok_or_else(|| Status::unauthenticated("unknown or revoked token"))?;
        caller(identity, on_behalf_of, Vec::new())
    }
}

/// `/` separates an issuer's namespace from its users' names
/// (`user:keycloak/...`): configured identities never contain one.
fn reserved_namespace(field: &str, subject: &str) -> Result<(), FieldViolation> {
    if subject.contains('/') {
        return Err(FieldViolation::new(
            field,
            format!("{subject:?} contains '/', which is reserved for the namespaces of identity-provider users"),
        ));
    }
    Ok(())
}

/// UNAUTHENTICATED for a refused token, logged so operators see attacks:
/// the reason names the issuer and what failed, never the token.
fn refused(reason: String) -> Status {
    tracing::Span::current().record("auth.refused", reason.as_str());
    tracing::warn!(%reason, "token refused");
    Status::unauthenticated(format!("token refused: {reason}"))
}

/// The token of an `authorization: Bearer ...` header, if any.
fn header_bearer(headers: &http::HeaderMap) -> Option<&str> {
    secrets_common::auth::bearer_token(headers.get(http::header::AUTHORIZATION)?.to_str().ok()?)
}

/// The caller `identity` acting for `on_behalf_of` (or as itself).
fn caller(identity: &Identity, on_behalf_of: Option<Principal>, member_of: Vec<Principal>) -> Result<Caller, Status> {
    let own = &identity.own;
    let principal = match (&identity.policy, on_behalf_of) {
        (_, None) => own.clone(),
        (None, Some(_)) => {
            return Err(Status::permission_denied(format!(
                "{:?} is a user; only platform services may act on behalf of another principal ({ON_BEHALF_OF})",
                identity.name
            )));
        }
        (Some(policy), Some(p)) if p == *own || policy.act_for.iter().any(|pattern| pattern.matches(&p)) => p,
        (Some(_), Some(p)) => {
            return Err(Status::permission_denied(format!(
                "token {:?} may not act for {p}: its act_for does not allow it",
                identity.name
            )));
        }
    };
    let acting_for_other = principal != *own;
    let delegated = identity.policy.as_ref().is_some_and(|p| acting_for_other && !p.act_for_admins);
    // Groups from a user's own token do not travel to whom it acts for.
    let member_of = if acting_for_other { Vec::new() } else { member_of };
    Ok(Caller {
        name: identity.name.clone(),
        kind: identity.kind,
        principal,
        own: own.clone(),
        member_of,
        groups: identity.policy.as_ref().map(|p| p.groups.clone()),
        not_admin: delegated.then_some(NotAdmin::Delegated),
    })
}

/// Wraps a gRPC service so every call is authenticated first: the
/// [`Caller`] goes into the request's extensions, a refusal is answered
/// without reaching the service.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Authenticator,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, auth: Authenticator) -> Self {
        Self { inner, auth }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The ready service answers this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            match auth.authenticate(request.headers()).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
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
        let mut headers = http::HeaderMap::new();
        if let Some(t) = token {
            headers.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        if let Some(p) = on_behalf_of {
            headers.insert(ON_BEHALF_OF, p.parse().unwrap());
        }
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(authenticator().authenticate(&headers))
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
        assert_eq!(
            c.not_admin,
            Some(NotAdmin::Delegated),
            "acting for someone else: never as a platform admin unless allowed"
        );
        assert!(c.require(RpcGroup::Resolve, "ResolveSecrets").is_ok());
        assert!(c.require(RpcGroup::Workloads, "Check").is_ok());
        let err = c.require(RpcGroup::Admin, "GrantPlatformAdmin").unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("allows resolve, workloads"), "{}", err.message());
        let err = call(Some("t-spark"), Some("service:other")).unwrap_err();
        assert!(err.message().contains("may not act for service:other"), "{}", err.message());
        assert_eq!(call(Some("t-spark"), None).unwrap().not_admin, None, "acting as itself");
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
