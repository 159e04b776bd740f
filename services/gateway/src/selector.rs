//! `ListSelectableSecrets`, the secret selector: what a principal may pick
//! for a workload in a domain, each entry ready to paste as a secret
//! object. Needs LIST_SECRETS in the domain; Vault configs appear only
//! where the principal holds USE. Keys only, never values.

use std::collections::BTreeSet;

use secrets_common::{
    auth::{InternalChannel, act_as},
    authz::{AuthzClient, Question},
    error::{from_upstream, invalid_argument, to_rpc_status},
    validate,
};
use secrets_proto::{
    internal::v1::{self as internal, vault_reader_client::VaultReaderClient},
    v1::{self as pb, Permission, secret_service_client::SecretServiceClient},
};
use tonic::{Request, Status};

use crate::{
    auth::Caller,
    forward::{SECRET_SERVICE, VAULT_CONFIG_SERVICE},
};

#[derive(Clone)]
pub struct Selector {
    /// `features.secretsV2.enabled`: off, the selector offers placeholders
    /// only (no secret objects, no Vault keys).
    pub secrets_v2: bool,
    pub secrets: SecretServiceClient<InternalChannel>,
    pub vault: VaultReaderClient<InternalChannel>,
    pub authz: AuthzClient,
}

fn object(key: String, kind: pb::SourceType, id: &str) -> pb::SecretObject {
    pb::SecretObject { key, source: Some(pb::SecretSource { r#type: kind as i32, id: id.to_string() }) }
}

/// A domain or global key as the selector offers it: the legacy
/// placeholder always, the secret object while secretsV2 is on.
fn store_key(key: &str, domain: &str, label: &str, secrets_v2: bool) -> pb::SelectableSecret {
    pb::SelectableSecret {
        secret_object: secrets_v2.then(|| object(key.to_string(), pb::SourceType::Kubernetes, domain)),
        label: label.to_string(),
        placeholder: format!("${{secrets.{key}}}"),
    }
}

impl Selector {
    async fn list_keys(&self, caller: &Caller, scope: pb::Scope, domain: &str) -> Result<Vec<String>, Status> {
        let mut request = Request::new(pb::ListSecretsRequest { scope: scope as i32, domain: domain.to_string() });
        act_as(&mut request, &caller.principal, Some(&caller.name), &caller.member_of);
        let listed = self.secrets.clone().list_secrets(request).await.map_err(|s| from_upstream(SECRET_SERVICE, s))?;
        Ok(listed.into_inner().secrets.into_iter().map(|s| s.key).collect())
    }

    pub async fn select(&self, caller: &Caller, domain: &str) -> Result<pb::ListSelectableSecretsResponse, Status> {
        let principal = &caller.principal;
        validate::domain("domain", domain).map_err(invalid_argument)?;
        let mut errors = Vec::new();
        let vault_error = |label: &str, status: &Status| pb::SelectableSourceError {
            source: Some(pb::SecretSource { r#type: pb::SourceType::Vault as i32, id: String::new() }),
            label: label.to_string(),
            error: Some(to_rpc_status(status)),
        };
        let listed = if self.secrets_v2 {
            self.vault
                .clone()
                .list_domain_vault_configs(internal::ListDomainVaultConfigsRequest { domain: domain.to_string() })
                .await
                .map(|r| r.into_inner().configs)
        } else {
            // Vault keys can be referenced only by secret objects.
            Ok(Vec::new())
        };
        let configs = match listed {
            Ok(configs) => configs,
            Err(s) => {
                errors.push(vault_error(VAULT_CONFIG_SERVICE, &from_upstream(VAULT_CONFIG_SERVICE, s)));
                Vec::new()
            }
        };
        // One authz round trip: LIST_SECRETS in the domain, USE on each config.
        let groups = &caller.member_of;
        let mut questions =
            vec![Question::domain(principal, Permission::ListSecrets, Some(domain)).with_groups(groups)];
        questions.extend(
            configs.iter().map(|c| Question::vault_config(principal, Permission::Use, &c.id).with_groups(groups)),
        );
        let answers = caller.decide(&self.authz, questions).await?;
        if !answers[0].allowed {
            return Err(Status::permission_denied(format!(
                "{principal} may not list the secrets of domain {domain:?}: {}",
                answers[0].reason
            )));
        }
        let usable: Vec<&internal::DomainVaultConfig> =
            configs.iter().zip(&answers[1..]).filter(|(_, a)| a.allowed).map(|(c, _)| c).collect();

        let vault_keys = async {
            if usable.is_empty() {
                return Ok(Vec::new());
            }
            let ids = usable.iter().map(|c| c.id.clone()).collect();
            self.vault
                .clone()
                .list_keys_of_configs(internal::ListKeysOfConfigsRequest { config_ids: ids })
                .await
                .map(|r| r.into_inner().configs)
                .map_err(|s| from_upstream(VAULT_CONFIG_SERVICE, s))
        };
        let (domain_keys, global_keys, vault_keys) = tokio::join!(
            self.list_keys(caller, pb::Scope::Domain, domain),
            self.list_keys(caller, pb::Scope::Global, domain),
            vault_keys
        );
        let domain_keys = domain_keys?;
        let global_keys = global_keys?;
        let shadowed: BTreeSet<&String> = domain_keys.iter().collect();
        let mut secrets: Vec<pb::SelectableSecret> = Vec::new();
        for key in global_keys.iter().filter(|k| !shadowed.contains(k)) {
            secrets.push(store_key(key, domain, "global", self.secrets_v2));
        }
        for key in &domain_keys {
            secrets.push(store_key(key, domain, domain, self.secrets_v2));
        }
        match vault_keys {
            Err(s) => errors.push(vault_error(VAULT_CONFIG_SERVICE, &s)),
            Ok(per_config) => {
                for (config, keys) in usable.iter().zip(per_config) {
                    match keys.error {
                        Some(e) => errors.push(pb::SelectableSourceError {
                            source: Some(pb::SecretSource {
                                r#type: pb::SourceType::Vault as i32,
                                id: config.id.clone(),
                            }),
                            label: config.name.clone(),
                            error: Some(e),
                        }),
                        None => secrets.extend(keys.keys.into_iter().map(|key| pb::SelectableSecret {
                            secret_object: Some(object(key, pb::SourceType::Vault, &config.id)),
                            label: config.name.clone(),
                            placeholder: String::new(),
                        })),
                    }
                }
            }
        }
        secrets.sort_by(|a, b| (a.label.as_str(), key_of(a)).cmp(&(b.label.as_str(), key_of(b))));
        tracing::Span::current().record("count", secrets.len() as i64);
        Ok(pb::ListSelectableSecretsResponse { secrets, errors })
    }
}

fn key_of(s: &pb::SelectableSecret) -> &str {
    s.secret_object.as_ref().map_or(s.placeholder.as_str(), |o| o.key.as_str())
}
