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
use tonic::{Request, Response, Status};

use crate::auth::{Caller, RpcGroup};

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

/// Implements a service trait by forwarding every listed RPC to `client`.
macro_rules! forward {
    ($trait:ident, $client:ident, $service:expr, { $($method:ident($req:ident) -> $resp:ident [$group:ident, $kind:ident];)* }) => {
        #[tonic::async_trait]
        impl $trait for Forwarder {
            $(
                #[tracing::instrument(skip_all, fields(rpc = stringify!($method), upstream = $service, caller, principal))]
                async fn $method(&self, request: Request<pb::$req>) -> Result<Response<pb::$resp>, Status> {
                    let request = self.upstream(request, RpcGroup::$group, stringify!($method)).await?;
                    let response = self.$client.clone().$method(request).await.map_err(|s| {
                        tracing::debug!(code = ?s.code(), "upstream refused the call");
                        failed($service, Call::$kind, s)
                    })?;
                    Ok(Response::new(response.into_inner()))
                }
            )*
        }
    };
}

forward!(SecretService, secrets, SECRET_SERVICE, {
    create_secret(CreateSecretRequest) -> SecretMetadata [ManageSecrets, Write];
    update_secret(UpdateSecretRequest) -> SecretMetadata [ManageSecrets, Write];
    delete_secret(DeleteSecretRequest) -> DeleteSecretResponse [ManageSecrets, Write];
    list_secrets(ListSecretsRequest) -> ListSecretsResponse [ManageSecrets, Read];
});

forward!(AuthzService, authz, AUTHZ_SERVICE, {
    check(CheckRequest) -> CheckResponse [Workloads, Read];
    batch_check(BatchCheckRequest) -> BatchCheckResponse [Workloads, Read];
    add_domain_member(AddDomainMemberRequest) -> DomainMember [ManageAccess, Write];
    remove_domain_member(RemoveDomainMemberRequest) -> RemoveDomainMemberResponse [ManageAccess, Write];
    grant_domain_permission(GrantDomainPermissionRequest) -> DomainMember [ManageAccess, Write];
    revoke_domain_permission(RevokeDomainPermissionRequest) -> DomainMember [ManageAccess, Write];
    list_domain_members(ListDomainMembersRequest) -> ListDomainMembersResponse [ManageAccess, Read];
    create_group(CreateGroupRequest) -> Group [ManageAccess, Write];
    delete_group(DeleteGroupRequest) -> DeleteGroupResponse [ManageAccess, Write];
    add_group_member(AddGroupMemberRequest) -> Group [ManageAccess, Write];
    remove_group_member(RemoveGroupMemberRequest) -> Group [ManageAccess, Write];
    list_groups(ListGroupsRequest) -> ListGroupsResponse [ManageAccess, Read];
    create_bundle(CreateBundleRequest) -> Bundle [ManageAccess, Write];
    get_bundle(GetBundleRequest) -> Bundle [ManageAccess, Read];
    list_bundles(ListBundlesRequest) -> ListBundlesResponse [ManageAccess, Read];
    update_bundle(UpdateBundleRequest) -> Bundle [ManageAccess, Write];
    delete_bundle(DeleteBundleRequest) -> DeleteBundleResponse [ManageAccess, Write];
    grant_bundle_permission(GrantBundlePermissionRequest) -> Bundle [ManageAccess, Write];
    revoke_bundle_permission(RevokeBundlePermissionRequest) -> Bundle [ManageAccess, Write];
    grant_platform_admin(GrantPlatformAdminRequest) -> GrantPlatformAdminResponse [Admin, Write];
    revoke_platform_admin(RevokePlatformAdminRequest) -> RevokePlatformAdminResponse [Admin, Write];
    list_platform_admins(ListPlatformAdminsRequest) -> ListPlatformAdminsResponse [Admin, Read];
});

forward!(VaultConfigService, vault, VAULT_CONFIG_SERVICE, {
    create_vault_config(CreateVaultConfigRequest) -> VaultConfig [ManageSecrets, Write];
    get_vault_config(GetVaultConfigRequest) -> VaultConfig [ManageSecrets, Read];
    list_vault_configs(ListVaultConfigsRequest) -> ListVaultConfigsResponse [ManageSecrets, Read];
    update_vault_config(UpdateVaultConfigRequest) -> VaultConfig [ManageSecrets, Write];
    delete_vault_config(DeleteVaultConfigRequest) -> DeleteVaultConfigResponse [ManageSecrets, Write];
    test_vault_connection(TestVaultConnectionRequest) -> TestVaultConnectionResponse [ManageSecrets, Read];
    list_vault_keys(ListVaultKeysRequest) -> ListVaultKeysResponse [ManageSecrets, Read];
});
