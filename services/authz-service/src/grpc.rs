//! The tonic adapters of the authz service: the public `AuthzService` and
//! the internal `ResourceRegistry`.

use secrets_common::{
    Principal,
    auth::{Acting, InternalCall},
    validate::{self, FieldViolation},
};
use secrets_proto::{
    internal::v1::{self as internal, resource_registry_server::ResourceRegistry},
    v1::{self as pb, authz_service_server::AuthzService},
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    Error, Result,
    access::{Access, token_groups},
    policy::{Bundle, BundleChange, Check, Group, Member, Permission, Policy, ResourceType, Role, Target},
};

/// Checks in one `BatchCheck`: a resolve of the largest batch asks at most
/// this many.
pub const MAX_CHECKS: usize = 1_000;
/// Group and bundle names.
pub const MAX_NAME_LEN: usize = 128;
/// Group and bundle descriptions.
pub const MAX_DESCRIPTION_LEN: usize = 1_024;
/// Groups a token may carry into one check.
pub const MAX_TOKEN_GROUPS: usize = 256;

#[derive(Clone)]
pub struct AuthzGrpc {
    /// Who may do what: every RPC asks it first.
    access: Access,
    policy: Policy,
}

impl AuthzGrpc {
    pub fn new(policy: Policy) -> Self {
        Self { access: Access::new(policy.clone()), policy }
    }
}

impl AuthzGrpc {
    /// Parses the checks (each error names its field) and answers them.
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
        let decisions = self.access.answer(call.principal.as_ref(), &parsed).await?;
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
        caller: &Acting,
        domain_name: &str,
        subject_name: &str,
        permission: i32,
        change: Change,
    ) -> Result<Response<pb::DomainMember>, Status> {
        let d = domain("domain", domain_name)?;
        let s = any_subject("subject", subject_name)?;
        let p = grantable("permission", permission)?;
        self.access.require_domain_access(caller, &d).await?;
        let (m, what) = match change {
            Change::Grant => (self.policy.grant(&d, &s, p).await?, "permission granted"),
            Change::Revoke => (self.policy.revoke(&d, &s, p).await?, "permission revoked"),
        };
        tracing::info!(domain = %d, subject = %s, permission = p.name(), %caller, "{what}");
        Ok(Response::new(member_pb(m)))
    }

    async fn change_bundle_grant(
        &self,
        caller: &Acting,
        bundle: &str,
        subject: &str,
        permission: i32,
        change: Change,
    ) -> Result<Response<pb::Bundle>, Status> {
        let b = name("bundle", bundle)?;
        let s = any_subject("subject", subject)?;
        let p = bundle_grantable("permission", permission)?;
        self.access
            .require(caller, Permission::ManageBundle, Target::Bundle(b.clone()), &format!("manage bundle {b}"))
            .await?;
        let (bundle, what) = match change {
            Change::Grant => (self.policy.grant_bundle(&b, &s, p).await?, "bundle permission granted"),
            Change::Revoke => (self.policy.revoke_bundle(&b, &s, p).await?, "bundle permission revoked"),
        };
        tracing::info!(bundle = %b, subject = %s, permission = p.name(), %caller, "{what}");
        Ok(Response::new(bundle_pb(bundle)))
    }
}

/// A principal that acts (user or service).
fn actor(field: &str, text: &str) -> Result<Principal> {
    Ok(Principal::parse(field, text)?)
}

/// A subject a grant or membership may name (user, service or group).
fn any_subject(field: &str, text: &str) -> Result<Principal> {
    Ok(Principal::parse_subject(field, text)?)
}

fn domain(field: &str, text: &str) -> Result<String> {
    validate::domain(field, text)?;
    Ok(text.to_string())
}

/// A group or bundle name: 1..128 of letters, digits, '.', '_' and '-'.
fn name(field: &str, text: &str) -> Result<String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if text.is_empty() || text.len() > MAX_NAME_LEN || !text.chars().all(ok) {
        return Err(FieldViolation::new(
            field,
            format!(
                "{} is not a name: 1 to {MAX_NAME_LEN} of letters, digits, '.', '_' and '-'",
                secrets_common::validate::echo(text)
            ),
        )
        .into());
    }
    Ok(text.to_string())
}

fn description(field: &str, text: &str) -> Result<String> {
    if text.len() > MAX_DESCRIPTION_LEN {
        return Err(
            FieldViolation::new(field, format!("is {} bytes; at most {MAX_DESCRIPTION_LEN}", text.len())).into()
        );
    }
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
        Ok(P::View) => Permission::View,
        Ok(P::Update) => Permission::Update,
        Ok(P::Use) => Permission::Use,
        Ok(P::ManageBundle) => Permission::ManageBundle,
        Ok(P::Unspecified) | Err(_) => {
            return Err(FieldViolation::new(
                field,
                "must be one of LIST_SECRETS, MANAGE_SECRETS, USE_SECRETS, MANAGE_DOMAIN_ACCESS, PLATFORM_ADMIN, VIEW, UPDATE, USE, MANAGE_BUNDLE",
            )
            .into());
        }
    })
}

fn permission_pb(p: Permission) -> i32 {
    use pb::Permission as P;
    (match p {
        Permission::ListSecrets => P::ListSecrets,
        Permission::ManageSecrets => P::ManageSecrets,
        Permission::UseSecrets => P::UseSecrets,
        Permission::ManageDomainAccess => P::ManageDomainAccess,
        Permission::PlatformAdmin => P::PlatformAdmin,
        Permission::View => P::View,
        Permission::Update => P::Update,
        Permission::Use => P::Use,
        Permission::ManageBundle => P::ManageBundle,
    }) as i32
}

fn resource(field: &str, r: Option<&pb::Resource>) -> Result<(ResourceType, String)> {
    let r = r.ok_or_else(|| FieldViolation::new(field, "is required: {type: VAULT_CONFIG, id: <config id>}"))?;
    let kind = match pb::ResourceType::try_from(r.r#type) {
        Ok(pb::ResourceType::VaultConfig) => ResourceType::VaultConfig,
        _ => return Err(FieldViolation::new(format!("{field}.type"), "must be VAULT_CONFIG").into()),
    };
    Ok((kind, name(&format!("{field}.id"), &r.id)?))
}

fn resource_pb(kind: ResourceType, id: String) -> pb::Resource {
    let t = match kind {
        ResourceType::VaultConfig => pb::ResourceType::VaultConfig,
    };
    pb::Resource { r#type: t as i32, id }
}

fn parse_check(c: &pb::CheckRequest, prefix: String) -> Result<Check> {
    let field = |f: &str| format!("{prefix}{f}");
    let subject = actor(&field("subject"), &c.subject)?;
    let permission = permission(&field("permission"), c.permission)?;
    let target = if permission == Permission::PlatformAdmin && c.domain.is_empty() {
        Target::Platform
    } else if permission == Permission::ManageBundle || (permission.is_bundle_permission() && c.resource.is_none()) {
        if c.bundle.is_empty() {
            return Err(FieldViolation::new(
                field("bundle"),
                format!("is required for {} (or set resource, for VIEW, UPDATE and USE)", permission.name()),
            )
            .into());
        }
        Target::Bundle(name(&field("bundle"), &c.bundle)?)
    } else if permission.is_bundle_permission() {
        let (kind, id) = resource(&field("resource"), c.resource.as_ref())?;
        Target::Resource(kind, id)
    } else {
        Target::Domain(domain(&field("domain"), &c.domain)?)
    };
    if c.groups.len() > MAX_TOKEN_GROUPS {
        return Err(FieldViolation::new(
            field("groups"),
            format!("has {} groups; at most {MAX_TOKEN_GROUPS}", c.groups.len()),
        )
        .into());
    }
    let token_groups = c
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let p = any_subject(&field(&format!("groups[{i}]")), g)?;
            if !p.is_group() {
                return Err(FieldViolation::new(field(&format!("groups[{i}]")), "must be \"group:NAME\"").into());
            }
            Ok(p.name)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Check { subject, permission, target, token_groups })
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

fn bundle_grantable(field: &str, value: i32) -> Result<Permission> {
    let p = permission(field, value)?;
    if !p.is_bundle_grantable() {
        return Err(FieldViolation::new(
            field,
            format!("{} cannot be granted on a bundle; grant VIEW, UPDATE or USE", p.name()),
        )
        .into());
    }
    Ok(p)
}

fn member_pb(m: Member) -> pb::DomainMember {
    pb::DomainMember {
        domain: m.domain,
        subject: m.subject.to_string(),
        role: match m.role {
            Role::Owner => pb::DomainRole::Owner,
            Role::Member => pb::DomainRole::Member,
        } as i32,
        permissions: m.permissions.into_iter().map(permission_pb).collect(),
    }
}

fn group_pb(g: Group) -> pb::Group {
    pb::Group { name: g.name, description: g.description, members: g.members.iter().map(ToString::to_string).collect() }
}

fn bundle_pb(b: Bundle) -> pb::Bundle {
    pb::Bundle {
        name: b.name,
        description: b.description,
        owner: b.owner.to_string(),
        grants: b
            .grants
            .into_iter()
            .map(|(s, p)| pb::BundleGrant { subject: s.to_string(), permission: permission_pb(p) })
            .collect(),
        resources: b.resources.into_iter().map(|(k, id)| resource_pb(k, id)).collect(),
    }
}

/// The acting principal and the groups its identity token names.
fn caller<T>(request: &Request<T>) -> Result<Acting, Status> {
    InternalCall::of(request).require_acting()
}

#[tonic::async_trait]
impl AuthzService for AuthzGrpc {
    #[instrument(skip_all, fields(rpc = "Check", subject = %request.get_ref().subject, domain = %request.get_ref().domain, allowed))]
    async fn check(&self, request: Request<pb::CheckRequest>) -> Result<Response<pb::CheckResponse>, Status> {
        let call = InternalCall::of(&request);
        let answer = self
            .answer(&call, vec![request.into_inner()])
            .await?
            .pop()
            .ok_or_else(|| Status::internal("internal error"))?;
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
        let s = any_subject("subject", &req.subject)?;
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
        self.access.require_domain_access(&caller, &d).await?;
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
        let s = any_subject("subject", &req.subject)?;
        self.access.require_domain_access(&caller, &d).await?;
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
        self.access.require_domain_access(&caller, &d).await?;
        let members = self.policy.members(&d).await?.into_iter().map(member_pb).collect();
        Ok(Response::new(pb::ListDomainMembersResponse { members }))
    }

    #[instrument(skip_all, fields(rpc = "CreateGroup", group = %request.get_ref().name))]
    async fn create_group(&self, request: Request<pb::CreateGroupRequest>) -> Result<Response<pb::Group>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let n = name("name", &req.name)?;
        let d = description("description", &req.description)?;
        self.access.require_admin(&caller, "manage groups").await?;
        let g = self.policy.create_group(&n, &d).await?;
        tracing::info!(group = %n, %caller, "group created");
        Ok(Response::new(group_pb(g)))
    }

    #[instrument(skip_all, fields(rpc = "DeleteGroup", group = %request.get_ref().name))]
    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let caller = caller(&request)?;
        let n = name("name", &request.get_ref().name)?;
        self.access.require_admin(&caller, "manage groups").await?;
        self.policy.delete_group(&n).await?;
        tracing::info!(group = %n, %caller, "group deleted");
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "AddGroupMember", group = %request.get_ref().group, member = %request.get_ref().member))]
    async fn add_group_member(
        &self,
        request: Request<pb::AddGroupMemberRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let g = name("group", &req.group)?;
        let m = any_subject("member", &req.member)?;
        self.access.require_admin(&caller, "manage groups").await?;
        let group = self.policy.add_group_member(&g, &m).await?;
        tracing::info!(group = %g, member = %m, %caller, "group member added");
        Ok(Response::new(group_pb(group)))
    }

    #[instrument(skip_all, fields(rpc = "RemoveGroupMember", group = %request.get_ref().group, member = %request.get_ref().member))]
    async fn remove_group_member(
        &self,
        request: Request<pb::RemoveGroupMemberRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let g = name("group", &req.group)?;
        let m = any_subject("member", &req.member)?;
        self.access.require_admin(&caller, "manage groups").await?;
        let group = self.policy.remove_group_member(&g, &m).await?;
        tracing::info!(group = %g, member = %m, %caller, "group member removed");
        Ok(Response::new(group_pb(group)))
    }

    #[instrument(skip_all, fields(rpc = "ListGroups"))]
    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let caller = caller(&request)?;
        self.access.require_admin(&caller, "list groups").await?;
        let groups = self.policy.groups().await?.into_iter().map(group_pb).collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    #[instrument(skip_all, fields(rpc = "CreateBundle", bundle = %request.get_ref().name))]
    async fn create_bundle(&self, request: Request<pb::CreateBundleRequest>) -> Result<Response<pb::Bundle>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let n = name("name", &req.name)?;
        let d = description("description", &req.description)?;
        let owner = bundle_owner("owner", &req.owner)?;
        self.access.require_admin(&caller, "create bundles").await?;
        let b = self.policy.create_bundle(&n, &d, &owner).await?;
        tracing::info!(bundle = %n, %owner, %caller, "bundle created");
        Ok(Response::new(bundle_pb(b)))
    }

    #[instrument(skip_all, fields(rpc = "GetBundle", bundle = %request.get_ref().name))]
    async fn get_bundle(&self, request: Request<pb::GetBundleRequest>) -> Result<Response<pb::Bundle>, Status> {
        let caller = caller(&request)?;
        let n = name("name", &request.get_ref().name)?;
        if self.access.visible_bundles(&caller, vec![n.clone()]).await?.is_empty() {
            return Err(Error::PermissionDenied(format!(
                "{caller} may not see bundle {n}: it holds no permission on it, directly or through a group"
            ))
            .into());
        }
        Ok(Response::new(bundle_pb(self.policy.bundle(&n).await?)))
    }

    #[instrument(skip_all, fields(rpc = "ListBundles", count))]
    async fn list_bundles(
        &self,
        request: Request<pb::ListBundlesRequest>,
    ) -> Result<Response<pb::ListBundlesResponse>, Status> {
        let caller = caller(&request)?;
        let names = self.policy.bundle_names().await?;
        let mut bundles = Vec::new();
        for n in self.access.visible_bundles(&caller, names).await? {
            bundles.push(bundle_pb(self.policy.bundle(&n).await?));
        }
        tracing::Span::current().record("count", bundles.len() as i64);
        Ok(Response::new(pb::ListBundlesResponse { bundles }))
    }

    #[instrument(skip_all, fields(rpc = "UpdateBundle", bundle = %request.get_ref().name))]
    async fn update_bundle(&self, request: Request<pb::UpdateBundleRequest>) -> Result<Response<pb::Bundle>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let n = name("name", &req.name)?;
        if let Some(new_name) = req.new_name.as_deref().filter(|new| *new != n) {
            return Err(Error::FailedPrecondition(format!(
                "bundle names never change (grants and resources refer to them): {n} cannot become {new_name:?}; create a new bundle instead"
            ))
            .into());
        }
        let change = BundleChange {
            description: req.description.as_deref().map(|d| description("description", d)).transpose()?,
            owner: req.owner.as_deref().map(|o| bundle_owner("owner", o)).transpose()?,
        };
        if change.owner.is_some() {
            self.access.require_admin(&caller, &format!("change the owner of bundle {n}")).await?;
        } else {
            self.access
                .require(&caller, Permission::ManageBundle, Target::Bundle(n.clone()), &format!("manage bundle {n}"))
                .await?;
        }
        let b = self.policy.update_bundle(&n, change).await?;
        tracing::info!(bundle = %n, %caller, "bundle updated");
        Ok(Response::new(bundle_pb(b)))
    }

    #[instrument(skip_all, fields(rpc = "DeleteBundle", bundle = %request.get_ref().name))]
    async fn delete_bundle(
        &self,
        request: Request<pb::DeleteBundleRequest>,
    ) -> Result<Response<pb::DeleteBundleResponse>, Status> {
        let caller = caller(&request)?;
        let n = name("name", &request.get_ref().name)?;
        self.access
            .require(&caller, Permission::ManageBundle, Target::Bundle(n.clone()), &format!("delete bundle {n}"))
            .await?;
        self.policy.delete_bundle(&n).await?;
        tracing::info!(bundle = %n, %caller, "bundle deleted");
        Ok(Response::new(pb::DeleteBundleResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "GrantBundlePermission", bundle = %request.get_ref().bundle, subject = %request.get_ref().subject))]
    async fn grant_bundle_permission(
        &self,
        request: Request<pb::GrantBundlePermissionRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.change_bundle_grant(&caller, &req.bundle, &req.subject, req.permission, Change::Grant).await
    }

    #[instrument(skip_all, fields(rpc = "RevokeBundlePermission", bundle = %request.get_ref().bundle, subject = %request.get_ref().subject))]
    async fn revoke_bundle_permission(
        &self,
        request: Request<pb::RevokeBundlePermissionRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.change_bundle_grant(&caller, &req.bundle, &req.subject, req.permission, Change::Revoke).await
    }

    #[instrument(skip_all, fields(rpc = "GrantPlatformAdmin", subject = %request.get_ref().subject))]
    async fn grant_platform_admin(
        &self,
        request: Request<pb::GrantPlatformAdminRequest>,
    ) -> Result<Response<pb::GrantPlatformAdminResponse>, Status> {
        let caller = caller(&request)?;
        let s = actor("subject", &request.get_ref().subject)?;
        self.access.require_admin(&caller, "manage platform admins").await?;
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
        let s = actor("subject", &request.get_ref().subject)?;
        self.access.require_admin(&caller, "manage platform admins").await?;
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
        self.access.require_admin(&caller, "manage platform admins").await?;
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

/// A bundle owner: a user or a group.
fn bundle_owner(field: &str, text: &str) -> Result<Principal> {
    let owner = any_subject(field, text)?;
    if owner.kind == secrets_common::principal::SubjectKind::Service {
        return Err(FieldViolation::new(field, "a bundle is owned by a user or a group, not a service").into());
    }
    Ok(owner)
}

#[tonic::async_trait]
impl ResourceRegistry for AuthzGrpc {
    /// Only domain owners and platform admins create resources, and only in
    /// a bundle they may place things in (its owner, or a platform admin).
    #[instrument(skip_all, fields(rpc = "RegisterResource", bundle = %request.get_ref().bundle, domain = %request.get_ref().domain))]
    async fn register_resource(
        &self,
        request: Request<internal::RegisterResourceRequest>,
    ) -> Result<Response<internal::RegisterResourceResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let (kind, id) = resource("resource", req.resource.as_ref())?;
        let b = name("bundle", &req.bundle)?;
        let d = domain("domain", &req.domain)?;
        let checks = [
            Check {
                subject: caller.principal.clone(),
                permission: Permission::ManageDomainAccess,
                target: Target::Domain(d.clone()),
                token_groups: token_groups(&caller),
            },
            Check {
                subject: caller.principal.clone(),
                permission: Permission::ManageBundle,
                target: Target::Bundle(b.clone()),
                token_groups: token_groups(&caller),
            },
        ];
        let decisions = self.access.decide(&caller, &checks).await?;
        if let Some(denied) = decisions.iter().find(|d| !d.allowed) {
            return Err(Error::PermissionDenied(format!(
                "{caller} may not create a {} in domain {d:?} and bundle {b}: {}",
                kind.name(),
                denied.reason
            ))
            .into());
        }
        self.policy.register_resource(kind, &id, &b, &d).await?;
        tracing::info!(resource = %id, bundle = %b, domain = %d, %caller, "resource registered");
        Ok(Response::new(internal::RegisterResourceResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "UnregisterResource"))]
    async fn unregister_resource(
        &self,
        request: Request<internal::UnregisterResourceRequest>,
    ) -> Result<Response<internal::UnregisterResourceResponse>, Status> {
        let caller = caller(&request)?;
        let (kind, id) = resource("resource", request.get_ref().resource.as_ref())?;
        self.access
            .require(
                &caller,
                Permission::Update,
                Target::Resource(kind, id.clone()),
                &format!("delete {} {id}", kind.name()),
            )
            .await?;
        self.policy.unregister_resource(kind, &id).await?;
        tracing::info!(resource = %id, %caller, "resource unregistered");
        Ok(Response::new(internal::UnregisterResourceResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(permission: pb::Permission) -> pb::CheckRequest {
        pb::CheckRequest { subject: "user:alice".into(), permission: permission as i32, ..Default::default() }
    }

    fn violation(r: Result<Check>) -> String {
        match r {
            Err(Error::InvalidArgument(v)) => v[0].field.clone(),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_check_targets_what_its_permission_is_about_and_errors_name_the_field() {
        let admin = parse_check(&request(pb::Permission::PlatformAdmin), String::new()).unwrap();
        assert_eq!(admin.target, Target::Platform);
        let domain = pb::CheckRequest { domain: "sales".into(), ..request(pb::Permission::UseSecrets) };
        assert_eq!(parse_check(&domain, String::new()).unwrap().target, Target::Domain("sales".into()));
        let bundle = pb::CheckRequest { bundle: "lake".into(), ..request(pb::Permission::Use) };
        assert_eq!(parse_check(&bundle, String::new()).unwrap().target, Target::Bundle("lake".into()));
        let resource = pb::CheckRequest {
            resource: Some(pb::Resource { r#type: pb::ResourceType::VaultConfig as i32, id: "cfg-1".into() }),
            ..request(pb::Permission::View)
        };
        assert_eq!(
            parse_check(&resource, String::new()).unwrap().target,
            Target::Resource(ResourceType::VaultConfig, "cfg-1".into())
        );

        assert_eq!(violation(parse_check(&request(pb::Permission::Use), "checks[4].".into())), "checks[4].bundle");
        assert_eq!(violation(parse_check(&request(pb::Permission::UseSecrets), String::new())), "domain");
        assert_eq!(violation(parse_check(&request(pb::Permission::Unspecified), String::new())), "permission");
        let group_subject = pb::CheckRequest { subject: "group:eng".into(), ..domain.clone() };
        assert_eq!(violation(parse_check(&group_subject, String::new())), "subject");
        let user_as_group = pb::CheckRequest { groups: vec!["user:bob".into()], ..domain.clone() };
        assert_eq!(violation(parse_check(&user_as_group, String::new())), "groups[0]");
        let many = pb::CheckRequest { groups: vec!["group:g".into(); MAX_TOKEN_GROUPS + 1], ..domain };
        assert_eq!(violation(parse_check(&many, String::new())), "groups");
    }

    #[test]
    fn only_member_permissions_are_granted_in_a_domain_and_only_view_update_use_on_a_bundle() {
        assert!(grantable("permission", pb::Permission::ListSecrets as i32).is_ok());
        let role = grantable("permission", pb::Permission::ManageDomainAccess as i32).unwrap_err().to_string();
        assert!(role.contains("comes with a role"), "{role}");
        assert!(bundle_grantable("permission", pb::Permission::Use as i32).is_ok());
        let not = bundle_grantable("permission", pb::Permission::ManageSecrets as i32).unwrap_err().to_string();
        assert!(not.contains("cannot be granted on a bundle"), "{not}");
        assert_eq!(name("name", &"n".repeat(MAX_NAME_LEN)).unwrap().len(), MAX_NAME_LEN);
        assert!(name("name", &"n".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(name("name", "has space").is_err());
        assert!(description("description", &"d".repeat(MAX_DESCRIPTION_LEN + 1)).is_err());
    }
}
