//! The `Gateway` service's gRPC adapter: authenticates nothing itself (the
//! [`crate::auth`] layer did), names the caller on the span, and hands each
//! RPC to its room: [`Resolution`] (ResolveSecrets, ResolveWorkload with
//! [`crate::payload`]), [`SavedWorkloads`] (SaveWorkload, DeleteWorkload,
//! GetWorkloadReferences, ListSecretUsages) and [`Selector`]
//! (ListSelectableSecrets).

use secrets_common::{deadline, error::invalid_argument, validate::FieldViolation};
use secrets_proto::v1::{self as pb, gateway_server::Gateway};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    auth::{Caller, RpcGroup},
    feed::{self, Feed},
    payload,
    resolution::Resolution,
    selector::Selector,
    workloads::SavedWorkloads,
};

#[derive(Clone)]
pub struct GatewayService {
    pub resolution: Resolution,
    pub workloads: SavedWorkloads,
    pub selector: Selector,
    pub feed: Feed,
}

/// The authenticated caller, recorded on the current span.
fn traced_caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    let caller = Caller::of(request)?;
    let span = tracing::Span::current();
    span.record("caller", caller.name.as_str());
    span.record("principal", tracing::field::display(&caller.principal));
    Ok(caller)
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    #[instrument(
        skip_all,
        fields(rpc = "ResolveSecrets", caller, principal, domain = %request.get_ref().domain,
               items = request.get_ref().items.len() as i64, keys, denied, not_found, invalid, over_limit)
    )]
    async fn resolve_secrets(
        &self,
        request: Request<pb::ResolveSecretsRequest>,
    ) -> Result<Response<pb::ResolveSecretsResponse>, Status> {
        let caller = traced_caller(&request)?;
        let deadline = deadline::of(request.metadata());
        let response = self.resolution.resolve("ResolveSecrets", &caller, request.into_inner(), deadline).await?;
        tracing::debug!("resolved");
        Ok(Response::new(response))
    }

    #[instrument(skip_all, fields(rpc = "ResolveWorkload", caller, principal, domain = %request.get_ref().domain, keys, denied, not_found, invalid, over_limit))]
    async fn resolve_workload(
        &self,
        request: Request<pb::ResolveWorkloadRequest>,
    ) -> Result<Response<pb::ResolveWorkloadResponse>, Status> {
        let caller = traced_caller(&request)?;
        let deadline = deadline::of(request.metadata());
        let request = request.into_inner();
        let payload = request
            .payload
            .ok_or_else(|| invalid_argument(FieldViolation::new("payload", "is required: the workload's payload")))?;
        let items = payload::items(&payload)?;
        let resolved = self
            .resolution
            .resolve("ResolveWorkload", &caller, pb::ResolveSecretsRequest { domain: request.domain, items }, deadline)
            .await?;
        tracing::debug!("resolved");
        Ok(Response::new(payload::fill(payload, resolved.items)))
    }

    #[instrument(skip_all, fields(rpc = "SaveWorkload", caller, principal, domain = %request.get_ref().domain,
                                  id = %request.get_ref().id, validate_only = request.get_ref().validate_only,
                                  references, problems))]
    async fn save_workload(
        &self,
        request: Request<pb::SaveWorkloadRequest>,
    ) -> Result<Response<pb::SaveWorkloadResponse>, Status> {
        let caller = traced_caller(&request)?;
        let deadline = deadline::of(request.metadata());
        Ok(Response::new(self.workloads.save(&caller, request.into_inner(), deadline).await?))
    }

    #[instrument(skip_all, fields(rpc = "DeleteWorkload", caller, principal, domain = %request.get_ref().domain, id = %request.get_ref().id))]
    async fn delete_workload(
        &self,
        request: Request<pb::DeleteWorkloadRequest>,
    ) -> Result<Response<pb::DeleteWorkloadResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.workloads.delete(&caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "GetWorkloadReferences", caller, principal, domain = %request.get_ref().domain, id = %request.get_ref().id))]
    async fn get_workload_references(
        &self,
        request: Request<pb::GetWorkloadReferencesRequest>,
    ) -> Result<Response<pb::GetWorkloadReferencesResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.workloads.references(&caller, request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(rpc = "ListSecretUsages", caller, principal))]
    async fn list_secret_usages(
        &self,
        request: Request<pb::ListSecretUsagesRequest>,
    ) -> Result<Response<pb::ListSecretUsagesResponse>, Status> {
        let caller = traced_caller(&request)?;
        Ok(Response::new(self.workloads.secret_usages(&caller, request.into_inner()).await?))
    }

    type WatchSecretChangesStream = feed::Answers;

    #[instrument(skip_all, fields(rpc = "WatchSecretChanges", caller, principal, domain = %request.get_ref().domain,
                                  after = request.get_ref().after_revision))]
    async fn watch_secret_changes(
        &self,
        request: Request<pb::WatchSecretChangesRequest>,
    ) -> Result<Response<Self::WatchSecretChangesStream>, Status> {
        let caller = traced_caller(&request)?;
        let answers = self.feed.watch(&caller, request.into_inner()).await?;
        tracing::info!("watching secret changes");
        Ok(Response::new(answers))
    }

    #[instrument(skip_all, fields(rpc = "ListSelectableSecrets", caller, principal, domain = %request.get_ref().domain, count))]
    async fn list_selectable_secrets(
        &self,
        request: Request<pb::ListSelectableSecretsRequest>,
    ) -> Result<Response<pb::ListSelectableSecretsResponse>, Status> {
        let caller = traced_caller(&request)?;
        caller.require(RpcGroup::Workloads, "ListSelectableSecrets")?;
        Ok(Response::new(self.selector.select(&caller, &request.get_ref().domain).await?))
    }
}
