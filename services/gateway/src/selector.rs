//! `ListSelectableSecrets`, the secret selector: what a principal may pick
//! for a workload in a domain, each entry ready to paste as a secret
//! object. Needs LIST_SECRETS in the domain; Vault configs appear only
//! where the principal holds USE. Keys only, never values.

use std::{collections::BTreeSet, sync::Arc};

use secrets_common::{
    auth::{InternalChannel, act_as},
    authz::{Decisions, Question},
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
    pub catalog: Arc<dyn Catalog>,
    pub authz: Arc<dyn Decisions>,
}

/// What the selector lists from: keys of the store, as the secret-service
/// answers the caller, and the Vault configs of a domain and their keys.
#[tonic::async_trait]
pub trait Catalog: Send + Sync {
    /// The keys of `scope` (a domain's, or the global ones seen from
    /// `domain`), listed as the caller.
    async fn store_keys(&self, caller: &Caller, scope: pb::Scope, domain: &str) -> Result<Vec<String>, Status>;
    /// The Vault configs placed in `domain`.
    async fn vault_configs(&self, domain: &str) -> Result<Vec<internal::DomainVaultConfig>, Status>;
    /// The keys of each config, one answer per id, in order.
    async fn vault_keys(&self, config_ids: Vec<String>) -> Result<Vec<internal::ConfigKeys>, Status>;
}

/// The catalog over gRPC: the secret-service and the vault-config-service.
pub struct GrpcCatalog {
    pub secrets: SecretServiceClient<InternalChannel>,
    pub vault: VaultReaderClient<InternalChannel>,
}

#[tonic::async_trait]
impl Catalog for GrpcCatalog {
    async fn store_keys(&self, caller: &Caller, scope: pb::Scope, domain: &str) -> Result<Vec<String>, Status> {
        let mut request = Request::new(pb::ListSecretsRequest { scope: scope as i32, domain: domain.to_string() });
        act_as(&mut request, &caller.principal, Some(&caller.name), &caller.member_of);
        let listed = self.secrets.clone().list_secrets(request).await.map_err(|s| from_upstream(SECRET_SERVICE, s))?;
        Ok(listed.into_inner().secrets.into_iter().map(|s| s.key).collect())
    }

    async fn vault_configs(&self, domain: &str) -> Result<Vec<internal::DomainVaultConfig>, Status> {
        self.vault
            .clone()
            .list_domain_vault_configs(internal::ListDomainVaultConfigsRequest { domain: domain.to_string() })
            .await
            .map(|r| r.into_inner().configs)
            .map_err(|s| from_upstream(VAULT_CONFIG_SERVICE, s))
    }

    async fn vault_keys(&self, config_ids: Vec<String>) -> Result<Vec<internal::ConfigKeys>, Status> {
        self.vault
            .clone()
            .list_keys_of_configs(internal::ListKeysOfConfigsRequest { config_ids })
            .await
            .map(|r| r.into_inner().configs)
            .map_err(|s| from_upstream(VAULT_CONFIG_SERVICE, s))
    }
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
            self.catalog.vault_configs(domain).await
        } else {
            // Vault keys can be referenced only by secret objects.
            Ok(Vec::new())
        };
        let configs = match listed {
            Ok(configs) => configs,
            Err(s) => {
                errors.push(vault_error(VAULT_CONFIG_SERVICE, &s));
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
        let answers = caller.decide(self.authz.as_ref(), questions).await?;
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
            self.catalog.vault_keys(ids).await
        };
        let (domain_keys, global_keys, vault_keys) = tokio::join!(
            self.catalog.store_keys(caller, pb::Scope::Domain, domain),
            self.catalog.store_keys(caller, pb::Scope::Global, domain),
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

#[cfg(test)]
mod tests {
    use secrets_common::Principal;
    use tonic::Code;

    use super::*;
    use crate::auth::TokenKind;

    const LAKE: &str = "0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8b";
    const OPS: &str = "11111111-2222-3333-4444-555555555555";
    const BROKEN: &str = "99999999-2222-3333-4444-555555555555";

    /// Store keys by scope, three Vault configs, and whether the
    /// vault-config-service answers.
    struct Fixed {
        vault_down: bool,
    }

    #[tonic::async_trait]
    impl Catalog for Fixed {
        async fn store_keys(&self, _: &Caller, scope: pb::Scope, _: &str) -> Result<Vec<String>, Status> {
            Ok(match scope {
                pb::Scope::Domain => vec!["db".into(), "shared".into()],
                _ => vec!["shared".into(), "smtp".into()],
            })
        }

        async fn vault_configs(&self, _: &str) -> Result<Vec<internal::DomainVaultConfig>, Status> {
            if self.vault_down {
                return Err(Status::unavailable("vault-config-service: gone"));
            }
            Ok([(LAKE, "lake"), (OPS, "ops"), (BROKEN, "broken")]
                .iter()
                .map(|(id, name)| internal::DomainVaultConfig { id: id.to_string(), name: name.to_string() })
                .collect())
        }

        async fn vault_keys(&self, ids: Vec<String>) -> Result<Vec<internal::ConfigKeys>, Status> {
            Ok(ids
                .into_iter()
                .map(|id| internal::ConfigKeys {
                    error: (id == BROKEN).then(|| to_rpc_status(&Status::failed_precondition("sealed"))),
                    keys: if id == BROKEN { Vec::new() } else { vec![format!("{id}-key")] },
                    config_id: id,
                })
                .collect())
        }
    }

    /// LIST_SECRETS in the domain; USE on every config but `ops`.
    struct Grants {
        list: bool,
    }

    #[tonic::async_trait]
    impl Decisions for Grants {
        async fn batch_check(&self, questions: &[Question<'_>]) -> Result<Vec<pb::CheckResponse>, Status> {
            Ok(questions
                .iter()
                .map(|q| {
                    let allowed = match q.vault_config {
                        Some(id) => id != OPS,
                        None => self.list,
                    };
                    pb::CheckResponse { allowed, reason: "by the table".into() }
                })
                .collect())
        }
    }

    fn selector(secrets_v2: bool, vault_down: bool, list: bool) -> Selector {
        Selector { secrets_v2, catalog: Arc::new(Fixed { vault_down }), authz: Arc::new(Grants { list }) }
    }

    fn caller() -> Caller {
        Caller {
            name: "console".into(),
            kind: TokenKind::Service,
            principal: Principal::user("alice"),
            own: Principal::service("console-backend"),
            member_of: Vec::new(),
            groups: None,
            not_admin: None,
        }
    }

    fn listed(r: &pb::ListSelectableSecretsResponse) -> Vec<(String, String, String)> {
        r.secrets
            .iter()
            .map(|s| {
                (
                    s.label.clone(),
                    key_of(s).to_string(),
                    s.secret_object.as_ref().map_or(String::new(), |o| o.source.as_ref().unwrap().id.clone()),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn a_domain_key_hides_the_global_one_and_vault_keys_come_only_where_use_is_held() {
        let out = selector(true, false, true).select(&caller(), "sales").await.unwrap();
        let lake_key = format!("{LAKE}-key");
        assert_eq!(
            listed(&out),
            [
                ("global".to_string(), "smtp".to_string(), "sales".to_string()),
                ("lake".into(), lake_key, LAKE.into()),
                ("sales".into(), "db".into(), "sales".into()),
                ("sales".into(), "shared".into(), "sales".into()),
            ],
            "no ops keys (no USE), the broken config reported below"
        );
        assert_eq!(out.errors.len(), 1);
        assert_eq!(
            (out.errors[0].label.as_str(), out.errors[0].error.as_ref().unwrap().message.as_str()),
            ("broken", "sealed")
        );
        assert!(
            out.secrets.iter().all(|s| s.placeholder.is_empty()
                == s.secret_object
                    .as_ref()
                    .is_some_and(|o| o.source.as_ref().unwrap().r#type == pb::SourceType::Vault as i32)),
            "store keys carry a placeholder, Vault keys do not"
        );
    }

    #[tokio::test]
    async fn without_secret_objects_only_placeholders_are_offered_and_a_down_vault_service_is_reported_not_fatal() {
        let out = selector(false, false, true).select(&caller(), "sales").await.unwrap();
        assert!(out.secrets.iter().all(|s| s.secret_object.is_none() && s.placeholder.starts_with("${secrets.")));
        assert_eq!(out.secrets.len(), 3);

        let out = selector(true, true, true).select(&caller(), "sales").await.unwrap();
        assert_eq!(out.secrets.len(), 3, "the store's keys are still listed");
        assert_eq!(out.errors.len(), 1);
        assert_eq!(out.errors[0].error.as_ref().unwrap().code, Code::Unavailable as i32);

        let denied = selector(true, false, false).select(&caller(), "sales").await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(
            denied.message().starts_with("user:alice may not list the secrets of domain \"sales\""),
            "{}",
            denied.message()
        );
    }
}
