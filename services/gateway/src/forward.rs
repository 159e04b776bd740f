//! The management APIs of the internal services, reachable through the
//! gateway: each call is authenticated here, then forwarded with the acting
//! principal and the internal credential. The internal services authorize.

use secrets_common::{
    auth::{InternalChannel, act_as},
    error::from_upstream,
};
use secrets_proto::v1::{
    self as pb, authz_service_client::AuthzServiceClient, authz_service_server::AuthzService,
    secret_service_client::SecretServiceClient, secret_service_server::SecretService,
    vault_config_service_client::VaultConfigServiceClient, vault_config_service_server::VaultConfigService,
};
use tonic::{Code, Request, Response, Status};

use crate::{
    audit::{self, Audit, Record},
    auth::{Caller, RpcGroup},
};

pub const SECRET_SERVICE: &str = "secret-service";
pub const VAULT_CONFIG_SERVICE: &str = "vault-config-service";
pub const AUTHZ_SERVICE: &str = secrets_common::authz::AUTHZ_SERVICE;

#[derive(Clone)]
pub struct Forwarder {
    pub secrets: SecretServiceClient<InternalChannel>,
    pub authz: AuthzServiceClient<InternalChannel>,
    pub vault: VaultConfigServiceClient<InternalChannel>,
    /// Asks whether a delegated principal is a platform admin.
    pub checks: secrets_common::authz::AuthzClient,
    /// Every write is recorded.
    pub audit: Audit,
}

/// What an audit record says a management write was about.
#[derive(Default)]
pub struct Target {
    pub domain: String,
    pub references: Vec<pb::AuditReference>,
    pub detail: String,
}

/// The target of each management write, from its request (never a value).
pub trait Audited {
    fn target(&self) -> Target;
}

fn permission_name(p: i32) -> &'static str {
    pb::Permission::try_from(p).unwrap_or_default().as_str_name()
}

fn store_secret(scope: i32, domain: &str, key: &str) -> Target {
    let scope = pb::Scope::try_from(scope).unwrap_or_default();
    Target {
        domain: domain.to_string(),
        references: vec![pb::AuditReference {
            source: Some(pb::SecretSource { r#type: pb::SourceType::Kubernetes as i32, id: domain.to_string() }),
            key: key.to_string(),
            ..Default::default()
        }],
        detail: scope.as_str_name().to_string(),
    }
}

fn vault_config(id: &str, detail: String) -> Target {
    Target {
        domain: String::new(),
        references: vec![pb::AuditReference {
            source: Some(pb::SecretSource { r#type: pb::SourceType::Vault as i32, id: id.to_string() }),
            ..Default::default()
        }],
        detail,
    }
}

macro_rules! audited {
    ($($req:ident => |$r:ident| $body:expr;)*) => {
        $(impl Audited for pb::$req {
            fn target(&self) -> Target {
                let $r = self;
                $body
            }
        })*
    };
}

audited! {
    CreateSecretRequest => |r| store_secret(r.scope, &r.domain, &r.key);
    UpdateSecretRequest => |r| store_secret(r.scope, &r.domain, &r.key);
    DeleteSecretRequest => |r| {
        let mut t = store_secret(r.scope, &r.domain, &r.key);
        if r.force {
            t.detail.push_str(", force");
        }
        t
    };
    CreateVaultConfigRequest => |r| Target {
        domain: r.domain.clone(),
        references: Vec::new(),
        detail: format!("config {:?} in bundle {:?}", r.spec.as_ref().map(|s| s.name.as_str()).unwrap_or_default(), r.bundle),
    };
    UpdateVaultConfigRequest => |r| vault_config(&r.id, format!(
        "changed:{}{}{}{}{}{}",
        if r.name.is_some() { " name" } else { "" },
        if r.host.is_some() { " host" } else { "" },
        if r.path.is_some() { " path" } else { "" },
        if r.namespace.is_some() { " namespace" } else { "" },
        if r.ca_certificate.is_some() { " ca_certificate" } else { "" },
        if r.credentials.is_some() { " credentials" } else { "" },
    ));
    DeleteVaultConfigRequest => |r| vault_config(&r.id, if r.force { "force".into() } else { String::new() });
    AddDomainMemberRequest => |r| Target {
        domain: r.domain.clone(),
        detail: format!("{} as {}", r.subject, pb::DomainRole::try_from(r.role).unwrap_or_default().as_str_name()),
        ..Default::default()
    };
    RemoveDomainMemberRequest => |r| Target { domain: r.domain.clone(), detail: r.subject.clone(), ..Default::default() };
    GrantDomainPermissionRequest => |r| Target {
        domain: r.domain.clone(),
        detail: format!("{} to {}", permission_name(r.permission), r.subject),
        ..Default::default()
    };
    RevokeDomainPermissionRequest => |r| Target {
        domain: r.domain.clone(),
        detail: format!("{} from {}", permission_name(r.permission), r.subject),
        ..Default::default()
    };
    CreateGroupRequest => |r| Target { detail: format!("group {}", r.name), ..Default::default() };
    DeleteGroupRequest => |r| Target { detail: format!("group {}", r.name), ..Default::default() };
    AddGroupMemberRequest => |r| Target { detail: format!("{} to group {}", r.member, r.group), ..Default::default() };
    RemoveGroupMemberRequest => |r| Target { detail: format!("{} from group {}", r.member, r.group), ..Default::default() };
    CreateBundleRequest => |r| Target { detail: format!("bundle {} owned by {}", r.name, r.owner), ..Default::default() };
    UpdateBundleRequest => |r| Target { detail: format!("bundle {}", r.name), ..Default::default() };
    DeleteBundleRequest => |r| Target { detail: format!("bundle {}", r.name), ..Default::default() };
    GrantBundlePermissionRequest => |r| Target {
        detail: format!("{} on bundle {} to {}", permission_name(r.permission), r.bundle, r.subject),
        ..Default::default()
    };
    RevokeBundlePermissionRequest => |r| Target {
        detail: format!("{} on bundle {} from {}", permission_name(r.permission), r.bundle, r.subject),
        ..Default::default()
    };
    GrantPlatformAdminRequest => |r| Target { detail: r.subject.clone(), ..Default::default() };
    RevokePlatformAdminRequest => |r| Target { detail: r.subject.clone(), ..Default::default() };
}

impl Forwarder {
    /// Records a management write's outcome. The change is made (or not)
    /// whatever the record does: a record that cannot be stored is logged
    /// and counted, and strict mode refuses the next writes up front until
    /// the store takes records again.
    async fn record_write(
        &self,
        rpc: &'static str,
        caller: &Caller,
        target: Target,
        trace_id: String,
        code: Code,
        message: &str,
    ) {
        let decision = audit::decision_of(code);
        let mut references = target.references;
        for r in &mut references {
            r.decision = decision as i32;
        }
        let record = Record {
            rpc,
            caller: caller.own.to_string(),
            principal: caller.principal.to_string(),
            domain: target.domain,
            workload: None,
            references,
            decision,
            trace_id,
            detail: if code == Code::Ok { target.detail } else { format!("{}: {message}", target.detail) },
        };
        if let Err(e) = self.audit.record(record).await {
            tracing::error!(rpc, error = %e.message(), "a management write was made but its audit record could not be stored");
        }
    }
}

impl Forwarder {
    /// The request to send upstream: the same message, acting for the
    /// caller, once the token may call `rpc` and, acting for someone else
    /// without `act_for_admins`, the principal is no platform admin.
    async fn upstream<T>(&self, request: Request<T>, group: RpcGroup, rpc: &str) -> Result<Request<T>, Status> {
        let caller = Caller::of(&request)?;
        caller.require(group, rpc)?;
        caller.decide(&self.checks, Vec::new()).await?;
        upstream(request)
    }
}

/// Whether a forwarded call changes anything.
#[derive(Clone, Copy)]
enum Call {
    Read,
    Write,
}

/// How a forwarded call's failure is reported. A write that was sent and
/// then not answered in time may have been applied: `DEADLINE_EXCEEDED`
/// says so, where `UNAVAILABLE` always means it was not.
fn failed(service: &str, call: Call, s: Status) -> Status {
    match call {
        Call::Write => secrets_common::error::from_upstream_write(
            service,
            s,
            "send it again with the same request_id (secrets), or read it back first",
        ),
        Call::Read => from_upstream(service, s),
    }
}

/// The request to send upstream: the same message, acting for the caller.
fn upstream<T>(request: Request<T>) -> Result<Request<T>, Status> {
    let caller = Caller::of(&request)?;
    let mut out = Request::new(request.into_inner());
    act_as(&mut out, &caller.principal, Some(&caller.name), &caller.member_of);
    let span = tracing::Span::current();
    span.record("principal", tracing::field::display(&caller.principal));
    span.record("caller", caller.name.as_str());
    Ok(out)
}

/// Implements a service trait by forwarding every listed RPC to `client`;
/// writes are audited.
macro_rules! forward {
    ($trait:ident, $client:ident, $service:expr, { $($method:ident($req:ident) -> $resp:ident [$group:ident, $kind:ident, $rpc:literal];)* }) => {
        #[tonic::async_trait]
        impl $trait for Forwarder {
            $(
                #[tracing::instrument(skip_all, fields(rpc = stringify!($method), upstream = $service, caller, principal))]
                async fn $method(&self, request: Request<pb::$req>) -> Result<Response<pb::$resp>, Status> {
                    forward!(@call $kind, self, request, $client, $method, $group, $service, $rpc)
                }
            )*
        }
    };
    (@call Read, $self:ident, $request:ident, $client:ident, $method:ident, $group:ident, $service:expr, $rpc:literal) => {{
        let request = $self.upstream($request, RpcGroup::$group, $rpc).await?;
        let response = $self.$client.clone().$method(request).await.map_err(|s| {
            tracing::debug!(code = ?s.code(), "upstream refused the call");
            failed($service, Call::Read, s)
        })?;
        Ok(Response::new(response.into_inner()))
    }};
    (@call Write, $self:ident, $request:ident, $client:ident, $method:ident, $group:ident, $service:expr, $rpc:literal) => {{
        let caller = Caller::of(&$request)?;
        let trace_id = audit::trace_id_of($request.metadata());
        let target = Audited::target($request.get_ref());
        let result = async {
            $self.audit.ready()?;
            let request = $self.upstream($request, RpcGroup::$group, $rpc).await?;
            $self.$client.clone().$method(request).await.map_err(|s| {
                tracing::debug!(code = ?s.code(), "upstream refused the call");
                failed($service, Call::Write, s)
            })
        }
        .await;
        let (code, message) = match &result {
            Ok(_) => (Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_string()),
        };
        $self.record_write($rpc, &caller, target, trace_id, code, &message).await;
        Ok(Response::new(result?.into_inner()))
    }};
}

forward!(SecretService, secrets, SECRET_SERVICE, {
    create_secret(CreateSecretRequest) -> SecretMetadata [ManageSecrets, Write, "CreateSecret"];
    update_secret(UpdateSecretRequest) -> SecretMetadata [ManageSecrets, Write, "UpdateSecret"];
    delete_secret(DeleteSecretRequest) -> DeleteSecretResponse [ManageSecrets, Write, "DeleteSecret"];
    list_secrets(ListSecretsRequest) -> ListSecretsResponse [ManageSecrets, Read, "ListSecrets"];
});

forward!(AuthzService, authz, AUTHZ_SERVICE, {
    check(CheckRequest) -> CheckResponse [Workloads, Read, "Check"];
    batch_check(BatchCheckRequest) -> BatchCheckResponse [Workloads, Read, "BatchCheck"];
    add_domain_member(AddDomainMemberRequest) -> DomainMember [ManageAccess, Write, "AddDomainMember"];
    remove_domain_member(RemoveDomainMemberRequest) -> RemoveDomainMemberResponse [ManageAccess, Write, "RemoveDomainMember"];
    grant_domain_permission(GrantDomainPermissionRequest) -> DomainMember [ManageAccess, Write, "GrantDomainPermission"];
    revoke_domain_permission(RevokeDomainPermissionRequest) -> DomainMember [ManageAccess, Write, "RevokeDomainPermission"];
    list_domain_members(ListDomainMembersRequest) -> ListDomainMembersResponse [ManageAccess, Read, "ListDomainMembers"];
    create_group(CreateGroupRequest) -> Group [ManageAccess, Write, "CreateGroup"];
    delete_group(DeleteGroupRequest) -> DeleteGroupResponse [ManageAccess, Write, "DeleteGroup"];
    add_group_member(AddGroupMemberRequest) -> Group [ManageAccess, Write, "AddGroupMember"];
    remove_group_member(RemoveGroupMemberRequest) -> Group [ManageAccess, Write, "RemoveGroupMember"];
    list_groups(ListGroupsRequest) -> ListGroupsResponse [ManageAccess, Read, "ListGroups"];
    create_bundle(CreateBundleRequest) -> Bundle [ManageAccess, Write, "CreateBundle"];
    get_bundle(GetBundleRequest) -> Bundle [ManageAccess, Read, "GetBundle"];
    list_bundles(ListBundlesRequest) -> ListBundlesResponse [ManageAccess, Read, "ListBundles"];
    update_bundle(UpdateBundleRequest) -> Bundle [ManageAccess, Write, "UpdateBundle"];
    delete_bundle(DeleteBundleRequest) -> DeleteBundleResponse [ManageAccess, Write, "DeleteBundle"];
    grant_bundle_permission(GrantBundlePermissionRequest) -> Bundle [ManageAccess, Write, "GrantBundlePermission"];
    revoke_bundle_permission(RevokeBundlePermissionRequest) -> Bundle [ManageAccess, Write, "RevokeBundlePermission"];
    grant_platform_admin(GrantPlatformAdminRequest) -> GrantPlatformAdminResponse [Admin, Write, "GrantPlatformAdmin"];
    revoke_platform_admin(RevokePlatformAdminRequest) -> RevokePlatformAdminResponse [Admin, Write, "RevokePlatformAdmin"];
    list_platform_admins(ListPlatformAdminsRequest) -> ListPlatformAdminsResponse [Admin, Read, "ListPlatformAdmins"];
});

forward!(VaultConfigService, vault, VAULT_CONFIG_SERVICE, {
    create_vault_config(CreateVaultConfigRequest) -> VaultConfig [ManageSecrets, Write, "CreateVaultConfig"];
    get_vault_config(GetVaultConfigRequest) -> VaultConfig [ManageSecrets, Read, "GetVaultConfig"];
    list_vault_configs(ListVaultConfigsRequest) -> ListVaultConfigsResponse [ManageSecrets, Read, "ListVaultConfigs"];
    update_vault_config(UpdateVaultConfigRequest) -> VaultConfig [ManageSecrets, Write, "UpdateVaultConfig"];
    delete_vault_config(DeleteVaultConfigRequest) -> DeleteVaultConfigResponse [ManageSecrets, Write, "DeleteVaultConfig"];
    test_vault_connection(TestVaultConnectionRequest) -> TestVaultConnectionResponse [ManageSecrets, Read, "TestVaultConnection"];
    list_vault_keys(ListVaultKeysRequest) -> ListVaultKeysResponse [ManageSecrets, Read, "ListVaultKeys"];
});
