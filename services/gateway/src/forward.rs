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

use crate::auth::Caller;

pub const SECRET_SERVICE: &str = "secret-service";
pub const VAULT_CONFIG_SERVICE: &str = "vault-config-service";
pub const AUTHZ_SERVICE: &str = secrets_common::authz::AUTHZ_SERVICE;

#[derive(Clone)]
pub struct Forwarder {
    pub secrets: SecretServiceClient<InternalChannel>,
    pub authz: AuthzServiceClient<InternalChannel>,
    pub vault: VaultConfigServiceClient<InternalChannel>,
}

/// The request to send upstream: the same message, acting for the caller.
fn upstream<T>(request: Request<T>) -> Result<Request<T>, Status> {
    let caller = Caller::of(&request)?;
    let mut out = Request::new(request.into_inner());
    act_as(&mut out, &caller.principal, Some(&caller.name));
    tracing::Span::current().record("principal", tracing::field::display(&caller.principal));
    Ok(out)
}

/// Implements a service trait by forwarding every listed RPC to `client`.
macro_rules! forward {
    ($trait:ident, $client:ident, $service:expr, { $($method:ident($req:ident) -> $resp:ident;)* }) => {
        #[tonic::async_trait]
        impl $trait for Forwarder {
            $(
                #[tracing::instrument(skip_all, fields(rpc = stringify!($method), upstream = $service, principal))]
                async fn $method(&self, request: Request<pb::$req>) -> Result<Response<pb::$resp>, Status> {
                    let request = upstream(request)?;
                    let response = self.$client.clone().$method(request).await.map_err(|s| {
                        tracing::debug!(code = ?s.code(), "upstream refused the call");
                        from_upstream($service, s)
                    })?;
                    Ok(Response::new(response.into_inner()))
                }
            )*
        }
    };
}

forward!(SecretService, secrets, SECRET_SERVICE, {
    create_secret(CreateSecretRequest) -> SecretMetadata;
    update_secret(UpdateSecretRequest) -> SecretMetadata;
    delete_secret(DeleteSecretRequest) -> DeleteSecretResponse;
    list_secrets(ListSecretsRequest) -> ListSecretsResponse;
});

forward!(AuthzService, authz, AUTHZ_SERVICE, {
    check(CheckRequest) -> CheckResponse;
    batch_check(BatchCheckRequest) -> BatchCheckResponse;
    add_domain_member(AddDomainMemberRequest) -> DomainMember;
    remove_domain_member(RemoveDomainMemberRequest) -> RemoveDomainMemberResponse;
    grant_domain_permission(GrantDomainPermissionRequest) -> DomainMember;
    revoke_domain_permission(RevokeDomainPermissionRequest) -> DomainMember;
    list_domain_members(ListDomainMembersRequest) -> ListDomainMembersResponse;
    create_group(CreateGroupRequest) -> Group;
    delete_group(DeleteGroupRequest) -> DeleteGroupResponse;
    add_group_member(AddGroupMemberRequest) -> Group;
    remove_group_member(RemoveGroupMemberRequest) -> Group;
    list_groups(ListGroupsRequest) -> ListGroupsResponse;
    create_bundle(CreateBundleRequest) -> Bundle;
    get_bundle(GetBundleRequest) -> Bundle;
    list_bundles(ListBundlesRequest) -> ListBundlesResponse;
    update_bundle(UpdateBundleRequest) -> Bundle;
    delete_bundle(DeleteBundleRequest) -> DeleteBundleResponse;
    grant_bundle_permission(GrantBundlePermissionRequest) -> Bundle;
    revoke_bundle_permission(RevokeBundlePermissionRequest) -> Bundle;
    grant_platform_admin(GrantPlatformAdminRequest) -> GrantPlatformAdminResponse;
    revoke_platform_admin(RevokePlatformAdminRequest) -> RevokePlatformAdminResponse;
    list_platform_admins(ListPlatformAdminsRequest) -> ListPlatformAdminsResponse;
});

forward!(VaultConfigService, vault, VAULT_CONFIG_SERVICE, {
    create_vault_config(CreateVaultConfigRequest) -> VaultConfig;
    get_vault_config(GetVaultConfigRequest) -> VaultConfig;
    list_vault_configs(ListVaultConfigsRequest) -> ListVaultConfigsResponse;
    update_vault_config(UpdateVaultConfigRequest) -> VaultConfig;
    delete_vault_config(DeleteVaultConfigRequest) -> DeleteVaultConfigResponse;
    test_vault_connection(TestVaultConnectionRequest) -> TestVaultConnectionResponse;
    list_vault_keys(ListVaultKeysRequest) -> ListVaultKeysResponse;
});
