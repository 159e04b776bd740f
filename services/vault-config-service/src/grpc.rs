//! The tonic adapters: the public `VaultConfigService` and the internal
//! `VaultReader`.

use secrets_common::auth::{Acting, InternalCall};
use secrets_proto::{
    internal::v1::{self as internal, vault_reader_server::VaultReader},
    v1::{self as pb, vault_config_service_server::VaultConfigService},
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::configs::{Change, Config, Configs, method_of, timestamp};

#[derive(Clone)]
pub struct VaultGrpc {
    configs: Configs,
}

impl VaultGrpc {
    pub fn new(configs: Configs) -> Self {
        Self { configs }
    }
}

fn principal<T>(request: &Request<T>) -> Result<Acting, Status> {
    InternalCall::of(request).require_acting()
}

fn config_pb(c: Config) -> pb::VaultConfig {
    let r = c.row;
    pb::VaultConfig {
        id: r.id,
        domain: r.domain,
        name: r.name,
        bundle: r.bundle,
        host: r.host,
        path: r.path,
        namespace: r.namespace,
        has_ca_certificate: !r.ca_certificate.is_empty(),
        auth_method: method_of(&r.auth_method) as i32,
        credentials_set: c.credentials_set,
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
    }
}

#[tonic::async_trait]
impl VaultConfigService for VaultGrpc {
    #[instrument(skip_all, fields(rpc = "CreateVaultConfig", domain = %request.get_ref().domain, bundle = %request.get_ref().bundle, principal))]
    async fn create_vault_config(
        &self,
        request: Request<pb::CreateVaultConfigRequest>,
    ) -> Result<Response<pb::VaultConfig>, Status> {
        let principal = principal(&request)?;
        tracing::Span::current().record("principal", tracing::field::display(&principal));
        let req = request.into_inner();
        let spec = req.spec.unwrap_or_default();
        let config = self.configs.create(&principal, &req.domain, &req.bundle, &spec).await?;
        Ok(Response::new(config_pb(config)))
    }

    #[instrument(skip_all, fields(rpc = "GetVaultConfig", id = %request.get_ref().id))]
    async fn get_vault_config(
        &self,
        request: Request<pb::GetVaultConfigRequest>,
    ) -> Result<Response<pb::VaultConfig>, Status> {
        let principal = principal(&request)?;
        Ok(Response::new(config_pb(self.configs.get(&principal, &request.get_ref().id).await?)))
    }

    #[instrument(skip_all, fields(rpc = "ListVaultConfigs", domain = %request.get_ref().domain, count))]
    async fn list_vault_configs(
        &self,
        request: Request<pb::ListVaultConfigsRequest>,
    ) -> Result<Response<pb::ListVaultConfigsResponse>, Status> {
        let principal = principal(&request)?;
        let configs: Vec<_> =
            self.configs.list(&principal, &request.get_ref().domain).await?.into_iter().map(config_pb).collect();
        tracing::Span::current().record("count", configs.len() as i64);
        Ok(Response::new(pb::ListVaultConfigsResponse { configs }))
    }

    #[instrument(skip_all, fields(rpc = "UpdateVaultConfig", id = %request.get_ref().id))]
    async fn update_vault_config(
        &self,
        request: Request<pb::UpdateVaultConfigRequest>,
    ) -> Result<Response<pb::VaultConfig>, Status> {
        let principal = principal(&request)?;
        let req = request.into_inner();
        let change = Change {
            name: req.name,
            host: req.host,
            path: req.path,
            namespace: req.namespace,
            ca_certificate: req.ca_certificate,
            credentials: req.credentials,
            bundle: req.bundle,
        };
        Ok(Response::new(config_pb(self.configs.update(&principal, &req.id, change).await?)))
    }

    #[instrument(skip_all, fields(rpc = "DeleteVaultConfig", id = %request.get_ref().id))]
    async fn delete_vault_config(
        &self,
        request: Request<pb::DeleteVaultConfigRequest>,
    ) -> Result<Response<pb::DeleteVaultConfigResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let broken = self.configs.delete(&principal, &request.id, request.force).await?;
        Ok(Response::new(pb::DeleteVaultConfigResponse { broken }))
    }

    #[instrument(skip_all, fields(rpc = "TestVaultConnection", outcome))]
    async fn test_vault_connection(
        &self,
        request: Request<pb::TestVaultConnectionRequest>,
    ) -> Result<Response<pb::TestVaultConnectionResponse>, Status> {
        use pb::test_vault_connection_request::Target;
        let principal = principal(&request)?;
        let response = match request.into_inner().target {
            Some(Target::Id(id)) => self.configs.test_saved(&principal, &id).await?,
            Some(Target::Unsaved(u)) => {
                self.configs.test_unsaved(&principal, &u.domain, &u.spec.unwrap_or_default()).await?
            }
            None => {
                return Err(secrets_common::error::invalid_argument(secrets_common::validate::FieldViolation::new(
                    "target",
                    "set id (a saved config) or unsaved {domain, spec}",
                )));
            }
        };
        tracing::Span::current().record("outcome", response.outcome().as_str_name());
        Ok(Response::new(response))
    }

    #[instrument(skip_all, fields(rpc = "ListVaultKeys", id = %request.get_ref().id, count))]
    async fn list_vault_keys(
        &self,
        request: Request<pb::ListVaultKeysRequest>,
    ) -> Result<Response<pb::ListVaultKeysResponse>, Status> {
        let principal = principal(&request)?;
        let keys = self.configs.keys(&principal, &request.get_ref().id).await?;
        tracing::Span::current().record("count", keys.len() as i64);
        Ok(Response::new(pb::ListVaultKeysResponse { keys }))
    }
}

#[tonic::async_trait]
impl VaultReader for VaultGrpc {
    /// Values for the gateway's resolver, which has already checked USE.
    #[instrument(skip_all, fields(rpc = "ReadVaultSecrets", lookups = request.get_ref().lookups.len() as i64))]
    async fn read_vault_secrets(
        &self,
        request: Request<internal::ReadVaultSecretsRequest>,
    ) -> Result<Response<internal::ReadVaultSecretsResponse>, Status> {
        let req = request.into_inner();
        let results = self.configs.read(&req.lookups, req.max_value_bytes, req.presence_only).await?;
        Ok(Response::new(internal::ReadVaultSecretsResponse { results }))
    }

    #[instrument(skip_all, fields(rpc = "ListDomainVaultConfigs", domain = %request.get_ref().domain))]
    async fn list_domain_vault_configs(
        &self,
        request: Request<internal::ListDomainVaultConfigsRequest>,
    ) -> Result<Response<internal::ListDomainVaultConfigsResponse>, Status> {
        let configs = self
            .configs
            .of_domain(&request.get_ref().domain)
            .await?
            .into_iter()
            .map(|(id, name)| internal::DomainVaultConfig { id, name })
            .collect();
        Ok(Response::new(internal::ListDomainVaultConfigsResponse { configs }))
    }

    #[instrument(skip_all, fields(rpc = "ListKeysOfConfigs", configs = request.get_ref().config_ids.len() as i64))]
    async fn list_keys_of_configs(
        &self,
        request: Request<internal::ListKeysOfConfigsRequest>,
    ) -> Result<Response<internal::ListKeysOfConfigsResponse>, Status> {
        let configs = self.configs.keys_of(&request.get_ref().config_ids).await;
        Ok(Response::new(internal::ListKeysOfConfigsResponse { configs }))
    }
}
