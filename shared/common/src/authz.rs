//! The client every service uses to ask the authz service. Fails closed: when
//! the authz service cannot answer, the caller gets `UNAVAILABLE` and nothing
//! is allowed.

use secrets_proto::v1::{
    BatchCheckRequest, CheckRequest, CheckResponse, Permission, authz_service_client::AuthzServiceClient,
};
use tonic::Status;

use crate::{
    Principal,
    auth::{InternalChannel, InternalClient},
    error::from_upstream,
    observe::TracedChannel,
};

pub const AUTHZ_SERVICE: &str = "authz-service";

#[derive(Clone)]
pub struct AuthzClient {
    inner: AuthzServiceClient<InternalChannel>,
}

/// One question for the authz service.
#[derive(Clone, Debug)]
pub struct Question<'a> {
    pub subject: &'a Principal,
    pub permission: Permission,
    pub domain: Option<&'a str>,
    /// For VIEW, UPDATE and USE: the Vault config asked about.
    pub vault_config: Option<&'a str>,
    /// Groups of the subject from its identity provider.
    pub groups: &'a [Principal],
}

impl<'a> Question<'a> {
    /// A domain permission (or PLATFORM_ADMIN, with no domain).
    pub fn domain(subject: &'a Principal, permission: Permission, domain: Option<&'a str>) -> Self {
        Self { subject, permission, domain, vault_config: None, groups: &[] }
    }

    /// VIEW, UPDATE or USE on a Vault config.
    pub fn vault_config(subject: &'a Principal, permission: Permission, id: &'a str) -> Self {
        Self { subject, permission, domain: None, vault_config: Some(id), groups: &[] }
    }
}

impl<'a> Question<'a> {
    /// The same question, counting `groups` as memberships of the subject.
    pub fn with_groups(mut self, groups: &'a [Principal]) -> Self {
        self.groups = groups;
        self
    }
}

impl AuthzClient {
    pub fn new(channel: TracedChannel, client: InternalClient) -> Self {
        Self { inner: AuthzServiceClient::with_interceptor(channel, client) }
    }

    /// Asks several questions in one round trip; answers in order.
    pub async fn batch_check(&self, questions: &[Question<'_>]) -> Result<Vec<CheckResponse>, Status> {
        let checks = questions
            .iter()
            .map(|q| CheckRequest {
                subject: q.subject.to_string(),
                permission: q.permission as i32,
                domain: q.domain.unwrap_or_default().to_string(),
                resource: q.vault_config.map(|id| secrets_proto::v1::Resource {
                    r#type: secrets_proto::v1::ResourceType::VaultConfig as i32,
                    id: id.to_string(),
                }),
                groups: q.groups.iter().map(Principal::to_string).collect(),
                ..Default::default()
            })
            .collect::<Vec<_>>();
        let n = checks.len();
        let results = self
            .inner
            .clone()
            .batch_check(BatchCheckRequest { checks })
            .await
            .map_err(|s| from_upstream(AUTHZ_SERVICE, s))?
            .into_inner()
            .results;
        if results.len() != n {
            return Err(Status::unavailable(format!("{AUTHZ_SERVICE}: answered {} of {n} checks", results.len())));
        }
        Ok(results)
    }

    /// `Ok(())` when allowed, `PERMISSION_DENIED` saying what `action` needed
    /// and why it was refused otherwise.
    pub async fn require(&self, question: Question<'_>, action: &str) -> Result<(), Status> {
        let answer = self.batch_check(std::slice::from_ref(&question)).await?.remove(0);
        if answer.allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!("{} may not {action}: {}", question.subject, answer.reason)))
        }
    }
}
