//! The client of the usage index (served by the authz-service), and the
//! delete protection the secret-service and the vault-config-service share:
//! a delete of something saved workloads reference is refused, naming them,
//! unless forced; a forced delete reports them.

use secrets_proto::{
    internal::v1::{self as internal, usage_index_client::UsageIndexClient},
    v1 as pb,
};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    auth::{InternalChannel, InternalClient},
    error::from_upstream,
    observe::TracedChannel,
};

/// How errors name the index.
pub const USAGE_INDEX: &str = "usage index (authz-service)";
/// Workloads a refusal or a forced delete lists; the total counts them all.
pub const LISTED_WORKLOADS: u32 = 20;
/// Workloads named in a refusal's message (the details list more).
const NAMED_IN_MESSAGE: usize = 5;

#[derive(Clone)]
pub struct UsageClient {
    inner: UsageIndexClient<InternalChannel>,
}

/// `finance/SPARK_JOB/etl-daily ("ETL daily")`.
pub fn describe(w: &pb::WorkloadRef) -> String {
    let kind =
        pb::WorkloadKind::try_from(w.kind).unwrap_or_default().as_str_name().trim_start_matches("WORKLOAD_KIND_");
    if w.name.is_empty() || w.name == w.id {
        format!("{}/{kind}/{}", w.domain, w.id)
    } else {
        format!("{}/{kind}/{} ({:?})", w.domain, w.id, w.name)
    }
}

impl UsageClient {
    pub fn new(channel: TracedChannel, client: InternalClient) -> Self {
        Self {
            inner: UsageIndexClient::with_interceptor(channel, client)
                .max_decoding_message_size(crate::server::MAX_INTERNAL_MESSAGE_BYTES),
        }
    }

    fn failed(s: Status) -> Status {
        from_upstream(USAGE_INDEX, s)
    }

    /// A change of the index not answered in time may have landed; saving
    /// a workload replaces its record and deleting one twice is harmless,
    /// so the caller may simply send it again.
    fn failed_change(s: Status) -> Status {
        crate::error::from_upstream_write(USAGE_INDEX, s, "saving or deleting the workload again is safe")
    }

    pub async fn record(&self, request: internal::RecordWorkloadRequest) -> Result<bool, Status> {
        Ok(self.inner.clone().record_workload(request).await.map_err(Self::failed_change)?.into_inner().replaced)
    }

    pub async fn forget(&self, request: internal::ForgetWorkloadRequest) -> Result<bool, Status> {
        Ok(self.inner.clone().forget_workload(request).await.map_err(Self::failed_change)?.into_inner().removed)
    }

    pub async fn get(&self, request: internal::GetWorkloadRequest) -> Result<internal::GetWorkloadResponse, Status> {
        Ok(self.inner.clone().get_workload(request).await.map_err(Self::failed)?.into_inner())
    }

    pub async fn find(&self, request: internal::FindUsagesRequest) -> Result<internal::FindUsagesResponse, Status> {
        Ok(self.inner.clone().find_usages(request).await.map_err(Self::failed)?.into_inner())
    }

    pub async fn legacy(&self, request: internal::ListLegacyRequest) -> Result<internal::ListLegacyResponse, Status> {
        Ok(self.inner.clone().list_legacy(request).await.map_err(Self::failed)?.into_inner())
    }
}

/// The usage index as delete protection asks it: through [`UsageClient`],
/// or, in a unit test, a table.
#[tonic::async_trait]
pub trait Usages: Send + Sync {
    /// The saved workloads that reference a secret or a Vault config.
    async fn find(&self, request: internal::FindUsagesRequest) -> Result<internal::FindUsagesResponse, Status>;

    /// The usages a delete of `what` must consider. When the index cannot
    /// answer, `UNAVAILABLE` saying nothing was deleted: nothing is deleted
    /// blind.
    async fn find_before_delete(
        &self,
        what: &str,
        mut query: internal::FindUsagesRequest,
    ) -> Result<internal::FindUsagesResponse, Status> {
        query.limit = query.limit.max(LISTED_WORKLOADS);
        self.find(query).await.map_err(|s| {
            if s.code() == Code::Unavailable {
                Status::unavailable(format!(
                    "{}; {what} was not deleted, since the workloads that use it cannot be told",
                    s.message()
                ))
            } else {
                s
            }
        })
    }

    /// Before deleting `what`: `Ok(None)` when no saved workload references
    /// it; the workloads (to report as broken) when some do and `force` is
    /// set; otherwise `FAILED_PRECONDITION` naming them.
    async fn guard_delete(
        &self,
        what: &str,
        query: internal::FindUsagesRequest,
        force: bool,
    ) -> Result<Option<pb::BrokenWorkloads>, Status> {
        guard(what, self.find_before_delete(what, query).await?, force)
    }
}

#[tonic::async_trait]
impl Usages for UsageClient {
    async fn find(&self, request: internal::FindUsagesRequest) -> Result<internal::FindUsagesResponse, Status> {
        UsageClient::find(self, request).await
    }
}

/// What [`Usages::guard_delete`] decides from the usages found.
pub fn guard(
    what: &str,
    found: internal::FindUsagesResponse,
    force: bool,
) -> Result<Option<pb::BrokenWorkloads>, Status> {
    if found.total == 0 {
        return Ok(None);
    }
    if !force {
        return Err(in_use(what, &found));
    }
    Ok(Some(pb::BrokenWorkloads {
        workloads: found.usages.into_iter().take(LISTED_WORKLOADS as usize).filter_map(|u| u.workload).collect(),
        total: found.total,
    }))
}

/// `FAILED_PRECONDITION`: `what` is referenced by these workloads.
pub fn in_use(what: &str, found: &internal::FindUsagesResponse) -> Status {
    let named: Vec<String> = found
        .usages
        .iter()
        .take(NAMED_IN_MESSAGE)
        .map(|u| {
            let fields: Vec<&str> = u.references.iter().map(|r| r.field.as_str()).collect();
            format!("{} at {}", u.workload.as_ref().map(describe).unwrap_or_default(), fields.join(", "))
        })
        .collect();
    let more = found.total as usize - named.len();
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    let mut details = ErrorDetails::new();
    for u in &found.usages {
        let Some(w) = &u.workload else { continue };
        let fields: Vec<&str> = u.references.iter().map(|r| r.field.as_str()).collect();
        details.add_precondition_failure_violation(
            "IN_USE",
            format!("workload {}", describe(w)),
            format!("references it at {}", fields.join(", ")),
        );
    }
    Status::with_error_details(
        Code::FailedPrecondition,
        format!(
            "{what} is referenced by {} saved workload{}: {}{more}; remove those references (save the workloads \
             without them, or delete the workloads), or delete with force=true to break them",
            found.total,
            if found.total == 1 { "" } else { "s" },
            named.join("; "),
        ),
        details,
    )
}
