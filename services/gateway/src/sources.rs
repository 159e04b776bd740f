//! The secret sources resolution reads from, over gRPC: the secret
//! service's reader (KUBERNETES objects, placeholders, admin keys) and the
//! vault-config-service's (VAULT objects).

use secrets_common::{
    SecretValue,
    auth::InternalChannel,
    error::{self, from_upstream},
};
use secrets_proto::{
    internal::v1::{
        self as internal, secret_reader_client::SecretReaderClient, vault_reader_client::VaultReaderClient,
    },
    v1 as pb,
};
use std::time::Duration;

use tonic::{Code, Request, Status};

use crate::{
    forward::{SECRET_SERVICE, VAULT_CONFIG_SERVICE},
    resolution::{Read, Source, Target, deadline_passed, limits::MAX_RESPONSE_VALUE_BYTES},
};

/// KUBERNETES objects, placeholders and admin keys: the secret service.
#[derive(Clone)]
pub struct KubernetesSource {
    pub reader: SecretReaderClient<InternalChannel>,
}

/// VAULT objects: the vault-config-service.
#[derive(Clone)]
pub struct VaultSource {
    pub reader: VaultReaderClient<InternalChannel>,
}

#[tonic::async_trait]
impl Source for KubernetesSource {
    fn name(&self) -> &'static str {
        SECRET_SERVICE
    }

    async fn read(
        &self,
        lookups: &[&(Target, String)],
        presence_only: bool,
        within: Option<Duration>,
    ) -> Result<Vec<Option<Read>>, Status> {
        let request = internal::ReadSecretsRequest {
            lookups: lookups
                .iter()
                .map(|(t, key)| match t {
                    Target::Domain(d) => internal::SecretLookup {
                        scope: pb::Scope::Domain as i32,
                        domain: d.clone(),
                        key: key.clone(),
                        global_fallback: true,
                    },
                    Target::Admin | Target::Vault(_) => internal::SecretLookup {
                        scope: pb::Scope::Admin as i32,
                        domain: String::new(),
                        key: key.clone(),
                        global_fallback: false,
                    },
                })
                .collect(),
            max_value_bytes: MAX_RESPONSE_VALUE_BYTES as u64,
            presence_only,
        };
        let results = self
            .reader
            .clone()
            .read_secrets(bounded(request, within))
            .await
            .map_err(|s| failure(SECRET_SERVICE, s, within))?
            .into_inner()
            .results;
        Ok(results
            .into_iter()
            .map(|r| r.found.then(|| if r.withheld { Read::Withheld } else { Read::Found(SecretValue::new(r.value)) }))
            .collect())
    }
}

#[tonic::async_trait]
impl Source for VaultSource {
    fn name(&self) -> &'static str {
        VAULT_CONFIG_SERVICE
    }

    async fn read(
        &self,
        lookups: &[&(Target, String)],
        presence_only: bool,
        within: Option<Duration>,
    ) -> Result<Vec<Option<Read>>, Status> {
        use internal::vault_lookup_result::Result as R;
        let request = internal::ReadVaultSecretsRequest {
            lookups: lookups
                .iter()
                .map(|(t, key)| internal::VaultLookup {
                    config_id: match t {
                        Target::Vault(id) => id.clone(),
                        _ => String::new(),
                    },
                    key: key.clone(),
                })
                .collect(),
            max_value_bytes: MAX_RESPONSE_VALUE_BYTES as u64,
            presence_only,
        };
        let results = self
            .reader
            .clone()
            .read_vault_secrets(bounded(request, within))
            .await
            .map_err(|s| failure(VAULT_CONFIG_SERVICE, s, within))?
            .into_inner()
            .results;
        Ok(results
            .into_iter()
            .map(|r| match r.result {
                Some(R::Value(v)) => Some(Read::Found(SecretValue::new(v))),
                Some(R::Withheld(_)) => Some(Read::Withheld),
                Some(R::Error(e)) => Some(Read::Failed(Status::new(Code::from_i32(e.code), e.message))),
                None => Some(Read::Failed(Status::unavailable("vault-config-service: an empty answer"))),
            })
            .collect())
    }
}

/// A refusal of lookups built here from validated items is this service's
/// bug, and the internal field names mean nothing to the caller; anything
/// else is the peer failing.
/// A failed read as the items report it: past the time the caller's
/// deadline left for the hop (the channel enforces it too), a refusal of
/// the lookups, or the peer failing.
fn failure(peer: &str, s: Status, within: Option<Duration>) -> Status {
    match (within, s.code()) {
        (Some(within), Code::DeadlineExceeded | Code::Cancelled) => deadline_passed(peer, within),
        _ => internal_refusal(peer, s),
    }
}

fn internal_refusal(peer: &str, s: Status) -> Status {
    match s.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound | Code::OutOfRange => {
            error::internal(&format!("{peer} refused the resolver's lookups"), &s.message())
        }
        _ => from_upstream(peer, s),
    }
}

/// The request, telling the service (`grpc-timeout`) how long it has.
fn bounded<T>(message: T, within: Option<Duration>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(within) = within {
        request.set_timeout(within);
    }
    request
}
