//! Vault change detection for the change feed: a KV v2 secret that a
//! saved workload references gets a new version (someone ran `vault kv
//! put`), and the feed records which of its keys changed, with their reach.
//!
//! Only configs that saved workloads reference are polled. Each is asked
//! its secret's metadata `current_version` (no value moves) once per
//! interval, at a jittered moment so configs do not poll in step, within a
//! request budget per config, with the config's own connection (its one
//! token or AppRole login). A token whose policy does not cover the
//! metadata path is polled with a read instead. On a new version, the old
//! and the new version are read and compared in memory, so only the keys
//! that changed are reported (every key, when the old version is gone);
//! the values served from memory for the config are dropped. The version
//! seen is kept in the database, so a change made while no replica ran is
//! reported when one starts; replicas that see the same change record it
//! once (the feed's dedupe key names config, key and version).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use sea_orm::{ActiveValue::Set, DatabaseConnection, EntityTrait, sea_query::OnConflict};
use secrets_common::{
    changes::{self, Announcer, ChangeSink},
    usage::Usages,
};
use secrets_proto::{internal::v1 as internal, v1 as pb};
use serde::Deserialize;
use tokio::time::Instant;

use crate::{
    configs::Configs,
    db::{vault_config, vault_version},
    vault::{FailureKind, Fields},
};

/// The `[changes]` table of the vault-config-service's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangesConfig {
    /// How often each referenced config's secret is asked its version
    /// (jittered by up to a fifth either way); 0 turns detection off.
    pub vault_poll_interval_seconds: u64,
    /// Requests to Vault the detection may make per config per minute (a
    /// poll is one, a change two more); past it, polls wait.
    pub vault_poll_budget_per_minute: u32,
}

impl Default for ChangesConfig {
    fn default() -> Self {
        Self { vault_poll_interval_seconds: 60, vault_poll_budget_per_minute: 6 }
    }
}

/// One config's polling state.
struct Polled {
    next: Instant,
    /// Requests left in the budget, refilled continuously.
    tokens: f64,
    refilled: Instant,
    /// The token may not read the metadata path: poll with reads.
    by_reading: bool,
}

pub struct Poller {
    pub configs: Configs,
    pub db: DatabaseConnection,
    pub usage: Arc<dyn Usages>,
    pub log: Arc<dyn ChangeSink>,
    pub announcer: Announcer,
    pub settings: ChangesConfig,
}

/// A number in `[0, 1)`, different on every call.
fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
}

impl Poller {
    /// Polls until dropped (the task is aborted with the service).
    pub async fn run(self) {
        if self.settings.vault_poll_interval_seconds == 0 {
            return;
        }
        let interval = Duration::from_secs(self.settings.vault_poll_interval_seconds);
        let jittered = || interval.mul_f64(0.8 + 0.4 * random_unit());
        let mut polled: HashMap<String, Polled> = HashMap::new();
        let mut referenced_at: Option<Instant> = None;
        // At start, every config's first poll at its own moment in the
        // first interval; a config referenced later is polled at once.
        let mut starting = true;
        let mut referenced: BTreeSet<String> = BTreeSet::new();
        let tick = interval.clamp(Duration::from_millis(200), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            // Which configs saved workloads reference: asked again once
            // per interval.
            if referenced_at.is_none_or(|at| at.elapsed() >= interval) {
                let query = internal::FindUsagesRequest {
                    source_type: pb::SourceType::Vault as i32,
                    limit: 1,
                    ..Default::default()
                };
                match self.usage.find(query).await {
                    Ok(found) => {
                        referenced = found.source_ids.into_iter().collect();
                        referenced_at = Some(Instant::now());
                    }
                    Err(e) => tracing::debug!(error = %e.message(), "cannot tell which vault configs to watch yet"),
                }
                polled.retain(|id, _| referenced.contains(id));
            }
            let now = Instant::now();
            for id in &referenced {
                let state = polled.entry(id.clone()).or_insert_with(|| Polled {
                    next: if starting { now + interval.mul_f64(random_unit()) } else { now },
                    tokens: f64::from(self.settings.vault_poll_budget_per_minute),
                    refilled: now,
                    by_reading: false,
                });
                if state.next > now {
                    continue;
                }
                state.next = now + jittered();
                let budget = f64::from(self.settings.vault_poll_budget_per_minute);
                state.tokens = (state.tokens + state.refilled.elapsed().as_secs_f64() / 60.0 * budget).min(budget);
                state.refilled = now;
                if state.tokens < 1.0 {
                    tracing::debug!(config = %id, "vault change detection waits for its request budget");
                    continue;
                }
                if let Err(e) = self.poll(id, state).await {
                    tracing::debug!(config = %id, error = %e, "vault change detection could not poll the config");
                }
            }
            // The configs known at start are placed; later ones are polled
            // as soon as they are referenced.
            if referenced_at.is_some() {
                starting = false;
            }
        }
    }

    /// One poll of one config.
    async fn poll(&self, id: &str, state: &mut Polled) -> crate::Result<()> {
        let Some(row) = self.configs.rows().get(id).await? else { return Ok(()) };
        let connection = self.configs.connection_for(&row).await?;
        state.tokens -= 1.0;
        let version = if state.by_reading {
            connection.read_version(None).await.map_err(crate::Error::from)?.1
        } else {
            match connection.current_version().await {
                Ok(v) => v,
                Err(f) if f.kind == FailureKind::NoAccessToPath => {
                    tracing::info!(config = %id, "the config's token may not read its secret's metadata; polling with reads");
                    state.by_reading = true;
                    return Ok(());
                }
                Err(f) => return Err(f.into()),
            }
        };
        let seen = self.seen(&row).await?;
        let Some(before) = seen else {
            // First sight (or the config moved to another secret): nothing
            // to compare with yet.
            return self.remember(&row, version).await;
        };
        if version == before {
            return Ok(());
        }
        if version < before {
            // The secret was deleted and written anew: its versions start
            // over. Every key counts as changed, from this new baseline.
            tracing::info!(config = %id, from = before, to = version, "a vault secret's versions started over");
            let keys = connection.read_version(Some(version)).await.map_err(crate::Error::from)?.0;
            self.configs.forget_values(&row).await;
            for key in keys.keys() {
                self.announce(&row, key, pb::SecretChangeKind::SecretUpdated, version).await;
            }
            return self.remember(&row, version).await;
        }
        let changed = if state.tokens >= 2.0 {
            state.tokens -= 2.0;
            let old = connection.read_version(Some(before)).await.ok().map(|(f, _)| f);
            match (old, connection.read_version(Some(version)).await) {
                (Some(old), Ok((new, _))) => differing(&old, &new),
                // The old version is gone (deleted, destroyed): every key
                // counts as changed.
                (None, Ok((new, _))) => new.keys().map(|k| (k.clone(), pb::SecretChangeKind::SecretUpdated)).collect(),
                (_, Err(f)) => return Err(f.into()),
            }
        } else {
            self.referenced_keys(id).await?.into_iter().map(|k| (k, pb::SecretChangeKind::SecretUpdated)).collect()
        };
        self.configs.forget_values(&row).await;
        tracing::info!(config = %id, from = before, to = version, keys = changed.len(), "a vault secret got a new version");
        for (key, kind) in changed {
            self.announce(&row, &key, kind, version).await;
        }
        self.remember(&row, version).await
    }

    /// The version last seen for the config's current secret (its host,
    /// namespace and path: a config moved elsewhere starts over).
    async fn seen(&self, row: &vault_config::Model) -> crate::Result<Option<u64>> {
        let found =
            vault_version::Entity::find_by_id(row.id.clone()).one(&self.db).await.map_err(crate::Error::from)?;
        Ok(found.filter(|v| v.path == where_of(row)).map(|v| v.version as u64))
    }

    async fn remember(&self, row: &vault_config::Model, version: u64) -> crate::Result<()> {
        let model = vault_version::ActiveModel {
            config_id: Set(row.id.clone()),
            path: Set(where_of(row)),
            version: Set(version as i64),
        };
        vault_version::Entity::insert(model)
            .on_conflict(
                OnConflict::column(vault_version::Column::ConfigId)
                    .update_columns([vault_version::Column::Path, vault_version::Column::Version])
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map_err(crate::Error::from)?;
        Ok(())
    }

    async fn referenced_keys(&self, id: &str) -> crate::Result<BTreeSet<String>> {
        let query = internal::FindUsagesRequest {
            source_type: pb::SourceType::Vault as i32,
            source_id: id.to_string(),
            limit: changes::REACH_LIMIT,
            ..Default::default()
        };
        let found = self.usage.find(query).await?;
        Ok(found.usages.into_iter().flat_map(|u| u.references).map(|r| r.key).collect())
    }

    /// Records one key's change with its reach.
    async fn announce(&self, row: &vault_config::Model, key: &str, kind: pb::SecretChangeKind, version: u64) {
        let change = pb::SecretChange {
            revision: 0,
            kind: kind as i32,
            origin: pb::ChangeOrigin::Vault as i32,
            source: Some(pb::SecretSource { r#type: pb::SourceType::Vault as i32, id: row.id.clone() }),
            scope: pb::Scope::Unspecified as i32,
            domain: row.domain.clone(),
            key: key.to_string(),
            version: version.to_string(),
            changed_at: Some(changes::now()),
            changed_by: String::new(),
            reach: None,
            presumed: false,
        };
        let dedupe_key = format!("vault:{}:{key}:{version}", row.id);
        let (usage, log, id, key_owned) = (self.usage.clone(), self.log.clone(), row.id.clone(), key.to_string());
        let announcement: changes::Announcement = Arc::new(move || {
            let (usage, log, mut change, dedupe_key) = (usage.clone(), log.clone(), change.clone(), dedupe_key.clone());
            let query = internal::FindUsagesRequest {
                source_type: pb::SourceType::Vault as i32,
                source_id: id.clone(),
                key: key_owned.clone(),
                limit: changes::REACH_LIMIT,
                ..Default::default()
            };
            Box::pin(async move {
                let mut reach = changes::reach_of(usage.find(query).await?);
                change.reach = Some(reach.clone());
                let revisions = log.append(vec![internal::LoggedChange { change: Some(change), dedupe_key }]).await?;
                reach.revision = revisions.first().copied().unwrap_or_default();
                Ok(reach)
            })
        });
        self.announcer
            .announce(&format!("new version {version} of {key:?} in vault config {}", row.id), announcement)
            .await;
    }
}

/// Where a config's secret is: host, namespace and path.
fn where_of(row: &vault_config::Model) -> String {
    format!("{} {} {}", row.host, row.namespace, row.path)
}

/// The keys whose values differ between two versions of a secret.
fn differing(old: &Fields, new: &Fields) -> BTreeMap<String, pb::SecretChangeKind> {
    let mut changed = BTreeMap::new();
    for (k, v) in new {
        match old.get(k) {
            None => {
                changed.insert(k.clone(), pb::SecretChangeKind::SecretCreated);
            }
            Some(o) if o != v => {
                changed.insert(k.clone(), pb::SecretChangeKind::SecretUpdated);
            }
            Some(_) => {}
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        changed.insert(k.clone(), pb::SecretChangeKind::SecretDeleted);
    }
    changed
}

#[cfg(test)]
mod tests {
    use secrets_common::SecretValue;

    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs.iter().map(|(k, v)| (k.to_string(), SecretValue::from(v.to_string()))).collect()
    }

    #[test]
    fn only_the_keys_whose_values_differ_are_changed() {
        let old = fields(&[("same", "1"), ("rotated", "a"), ("gone", "x")]);
        let new = fields(&[("same", "1"), ("rotated", "b"), ("added", "y")]);
        let changed: Vec<_> = differing(&old, &new).into_iter().collect();
        assert_eq!(
            changed,
            [
                ("added".to_string(), pb::SecretChangeKind::SecretCreated),
                ("gone".to_string(), pb::SecretChangeKind::SecretDeleted),
                ("rotated".to_string(), pb::SecretChangeKind::SecretUpdated),
            ]
        );
    }
}
