//! The tonic adapter of the authz service.

use secrets_common::{
    Principal,
    auth::InternalCall,
    validate::{self, FieldViolation},
};
use secrets_proto::v1::{self as pb, authz_service_server::AuthzService};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    Error, Result,
    policy::{Check, Member, Permission, Policy, Role},
};

/// Checks in one `BatchCheck`: a resolve of the largest batch asks at most
/// this many.
pub const MAX_CHECKS: usize = 1_000;

#[derive(Clone)]
pub struct AuthzGrpc {
    policy: Policy,
}

impl AuthzGrpc {
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }

    /// Management calls need the caller to own the domain or be an admin.
    async fn require_domain_access(&self, caller: &Principal, domain: &str) -> Result<()> {
        let d = self.policy.check(caller, Permission::ManageDomainAccess, Some(domain)).await?;
        if d.allowed {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!("{caller} may not manage access to domain {domain:?}: {}", d.reason)))
        }
    }

    async fn require_admin(&self, caller: &Principal) -> Result<()> {
        if self.policy.is_platform_admin(caller).await? {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!("{caller} may not manage platform admins: it is not a platform admin")))
        }
    }

    /// Answers checks from one database query. A forwarded call (one that
    /// names a principal) may ask about its own principal only, unless that
    /// principal is an admin.
    async fn answer(&self, call: &InternalCall, checks: Vec<pb::CheckRequest>) -> Result<Vec<pb::CheckResponse>> {
        if checks.len() > MAX_CHECKS {
            return Err(FieldViolation::new(
                "checks",
                format!("has {} checks; at most {MAX_CHECKS} per call", checks.len()),
            )
            .into());
        }
        let parsed = checks
            .iter()
            .enumerate()
            .map(|(i, c)| parse_check(c, if checks.len() == 1 { String::new() } else { format!("checks[{i}].") }))
            .collect::<Result<Vec<_>>>()?;
        let (caller_is_admin, decisions) = self.policy.check_batch(call.principal.as_ref(), &parsed).await?;
        if let Some(caller) = &call.principal
            && parsed.iter().any(|c| &c.subject != caller)
            && !caller_is_admin
        {
            return Err(Error::PermissionDenied(format!(
                "{caller} may check its own permissions only; platform admins may check anyone's"
            )));
        }
        Ok(decisions.into_iter().map(|d| pb::CheckResponse { allowed: d.allowed, reason: d.reason }).collect())
    }
}

#[derive(Clone, Copy)]
enum Change {
    Grant,
    Revoke,
}

impl AuthzGrpc {
    async fn change_permission(
        &self,
        caller: &Principal,
        domain_name: &str,
        subject_name: &str,
        permission: i32,
        change: Change,
    ) -> Result<Response<pb::DomainMember>, Status> {
        let d = domain("domain", domain_name)?;
        let s = subject("subject", subject_name)?;
        let p = grantable("permission", permission)?;
        self.require_domain_access(caller, &d).await?;
        let (m, what) = match change {
            Change::Grant => (self.policy.grant(&d, &s, p).await?, "permission granted"),
            Change::Revoke => (self.policy.revoke(&d, &s, p).await?, "permission revoked"),
        };
        tracing::info!(domain = %d, subject = %s, permission = p.name(), %caller, "{what}");
        Ok(Response::new(member_pb(m)))
    }
}

fn subject(field: &str, text: &str) -> Result<Principal> {
    Ok(Principal::parse(field, text)?)
}

fn domain(field: &str, text: &str) -> Result<String> {
    validate::domain(field, text)?;
    Ok(text.to_string())
}

fn permission(field: &str, value: i32) -> Result<Permission> {
    use pb::Permission as P;
    Ok(match P::try_from(value) {
        Ok(P::ListSecrets) => Permission::ListSecrets,
        Ok(P::ManageSecrets) => Permission::ManageSecrets,
        Ok(P::UseSecrets) => Permission::UseSecrets,
        Ok(P::ManageDomainAccess) => Permission::ManageDomainAccess,
        Ok(P::PlatformAdmin) => Permission::PlatformAdmin,
        Ok(P::Unspecified) | Err(_) => {
            return Err(FieldViolation::new(
                field,
                "must be one of LIST_SECRETS, MANAGE_SECRETS, USE_SECRETS, MANAGE_DOMAIN_ACCESS, PLATFORM_ADMIN",
            )
            .into());
        }
    })
}

fn parse_check(c: &pb::CheckRequest, prefix: String) -> Result<Check> {
    let subject = subject(&format!("{prefix}subject"), &c.subject)?;
    let permission = permission(&format!("{prefix}permission"), c.permission)?;
    let domain = match (permission, c.domain.as_str()) {
        (Permission::PlatformAdmin, "") => None,
        (_, d) => Some(domain(&format!("{prefix}domain"), d)?),
    };
    Ok(Check { subject, permission, domain })
}

fn grantable(field: &str, value: i32) -> Result<Permission> {
    let p = permission(field, value)?;
    if !p.is_grantable() {
        return Err(FieldViolation::new(
            field,
            format!("{} comes with a role and cannot be granted; grant LIST_SECRETS or MANAGE_SECRETS", p.name()),
        )
        .into());
    }
    Ok(p)
}

fn member_pb(m: Member) -> pb::DomainMember {
    use pb::Permission as P;
    pb::DomainMember {
        domain: m.domain,
        subject: m.subject.to_string(),
        role: match m.role {
            Role::Owner => pb::DomainRole::Owner,
            Role::Member => pb::DomainRole::Member,
        } as i32,
        permissions: m
            .permissions
            .into_iter()
            .map(|p| match p {
                Permission::ListSecrets => P::ListSecrets,
                Permission::ManageSecrets => P::ManageSecrets,
                Permission::UseSecrets => P::UseSecrets,
                Permission::ManageDomainAccess => P::ManageDomainAccess,
                Permission::PlatformAdmin => P::PlatformAdmin,
            } as i32)
            .collect(),
    }
}

fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    InternalCall::of(request).require_principal().cloned()
}

#[tonic::async_trait]
impl AuthzService for AuthzGrpc {
    #[instrument(skip_all, fields(rpc = "Check", subject = %request.get_ref().subject, domain = %request.get_ref().domain, allowed))]
    async fn check(&self, request: Request<pb::CheckRequest>) -> Result<Response<pb::CheckResponse>, Status> {
        let call = InternalCall::of(&request);
        let answer = self.answer(&call, vec![request.into_inner()]).await?.remove(0);
        tracing::Span::current().record("allowed", answer.allowed);
        Ok(Response::new(answer))
    }

    #[instrument(skip_all, fields(rpc = "BatchCheck", checks = request.get_ref().checks.len() as i64, allowed))]
    async fn batch_check(
        &self,
        request: Request<pb::BatchCheckRequest>,
    ) -> Result<Response<pb::BatchCheckResponse>, Status> {
        let call = InternalCall::of(&request);
        let results = self.answer(&call, request.into_inner().checks).await?;
        tracing::Span::current().record("allowed", results.iter().filter(|r| r.allowed).count() as i64);
        Ok(Response::new(pb::BatchCheckResponse { results }))
    }

    #[instrument(skip_all, fields(rpc = "AddDomainMember", domain = %request.get_ref().domain, subject = %request.get_ref().subject))]
    async fn add_domain_member(
        &self,
        request: Request<pb::AddDomainMemberRequest>,
    ) -> Result<Response<pb::DomainMember>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let d = domain("domain", &req.domain)?;
        let s = subject("subject", &req.subject)?;
        let role = match pb::DomainRole::try_from(req.role) {
            Ok(pb::DomainRole::Owner) => Role::Owner,
            Ok(pb::DomainRole::Member) => Role::Member,
            _ => {
                return Err(Error::from(FieldViolation::new(
                    "role",
                    "must be DOMAIN_ROLE_OWNER or DOMAIN_ROLE_MEMBER",
                ))
                .into());
            }
        };
        self.require_domain_access(&caller, &d).await?;
        let m = self.policy.add_member(&d, &s, role).await?;
        tracing::info!(domain = %d, subject = %s, role = ?role, %caller, "domain member set");
        Ok(Response::new(member_pb(m)))
    }

    #[instrument(skip_all, fields(rpc = "RemoveDomainMember", domain = %request.get_ref().domain, subject = %request.get_ref().subject))]
    async fn remove_domain_member(
        &self,
        request: Request<pb::RemoveDomainMemberRequest>,
    ) -> Result<Response<pb::RemoveDomainMemberResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let d = domain("domain", &req.domain)?;
        let s = subject("subject", &req.subject)?;
        self.require_domain_access(&caller, &d).await?;
        self.policy.remove_member(&d, &s).await?;
        tracing::info!(domain = %d, subject = %s, %caller, "domain member removed");
        Ok(Response::new(pb::RemoveDomainMemberResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "GrantDomainPermission", domain = %request.get_ref().domain, subject = %request.get_ref().subject))]
    async fn grant_domain_permission(
        &self,
        request: Request<pb::GrantDomainPermissionRequest>,
    ) -> Result<Response<pb::DomainMember>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.change_permission(&caller, &req.domain, &req.subject, req.permission, Change::Grant).await
    }

    #[instrument(skip_all, fields(rpc = "RevokeDomainPermission", domain = %request.get_ref().domain, subject = %request.get_ref().subject))]
    async fn revoke_domain_permission(
        &self,
        request: Request<pb::RevokeDomainPermissionRequest>,
    ) -> Result<Response<pb::DomainMember>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.change_permission(&caller, &req.domain, &req.subject, req.permission, Change::Revoke).await
    }

    #[instrument(skip_all, fields(rpc = "ListDomainMembers", domain = %request.get_ref().domain))]
    async fn list_domain_members(
        &self,
        request: Request<pb::ListDomainMembersRequest>,
    ) -> Result<Response<pb::ListDomainMembersResponse>, Status> {
        let caller = caller(&request)?;
        let d = domain("domain", &request.get_ref().domain)?;
        self.require_domain_access(&caller, &d).await?;
        let members = self.policy.members(&d).await?.into_iter().map(member_pb).collect();
        Ok(Response::new(pb::ListDomainMembersResponse { members }))
    }

    #[instrument(skip_all, fields(rpc = "GrantPlatformAdmin", subject = %request.get_ref().subject))]
    async fn grant_platform_admin(
        &self,
        request: Request<pb::GrantPlatformAdminRequest>,
    ) -> Result<Response<pb::GrantPlatformAdminResponse>, Status> {
        let caller = caller(&request)?;
        let s = subject("subject", &request.get_ref().subject)?;
        self.require_admin(&caller).await?;
        self.policy.grant_admin(&s).await?;
        tracing::info!(subject = %s, %caller, "platform admin granted");
        Ok(Response::new(pb::GrantPlatformAdminResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "RevokePlatformAdmin", subject = %request.get_ref().subject))]
    async fn revoke_platform_admin(
        &self,
        request: Request<pb::RevokePlatformAdminRequest>,
    ) -> Result<Response<pb::RevokePlatformAdminResponse>, Status> {
        let caller = caller(&request)?;
        let s = subject("subject", &request.get_ref().subject)?;
        self.require_admin(&caller).await?;
        self.policy.revoke_admin(&s).await?;
        tracing::info!(subject = %s, %caller, "platform admin revoked");
        Ok(Response::new(pb::RevokePlatformAdminResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "ListPlatformAdmins"))]
    async fn list_platform_admins(
        &self,
        request: Request<pb::ListPlatformAdminsRequest>,
    ) -> Result<Response<pb::ListPlatformAdminsResponse>, Status> {
        let caller = caller(&request)?;
        self.require_admin(&caller).await?;
        let admins = self
            .policy
            .admins()
            .await?
            .into_iter()
            .map(|(p, from_configuration)| pb::PlatformAdmin { subject: p.to_string(), from_configuration })
            .collect();
        Ok(Response::new(pb::ListPlatformAdminsResponse { admins }))
    }
}
