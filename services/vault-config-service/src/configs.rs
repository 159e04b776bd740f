//! The domain logic of Vault configs: who may do what, where each part is
//! kept (the row in the database, the credentials in the domain's store
//! object, the placement in the authz service's registry), and reading
//! values through cached connections. Knows nothing about gRPC.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, SubsecRound, Utc};
use moka::future::Cache;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, Set, TransactionTrait,
};
use secrets_common::{
    SecretValue,
    auth::{Acting, InternalChannel, act_as},
    authz::{Decisions, Question},
    error::from_upstream,
    usage::Usages,
    validate::{self, FieldViolation},
};
use secrets_proto::{
    internal::v1::{self as internal, resource_registry_client::ResourceRegistryClient},
    v1::{self as pb, Permission},
};
use secrets_store::{Entries, Entry, GroupCommit, StoreBackend};
use tonic::Request;

use crate::{
    Error, Result,
    db::vault_config,
    rows::Rows,
    spec::{self, Credentials, Target},
    vault::{Connection, Fields, VaultFailure},
};

const AUTHZ: &str = secrets_common::authz::AUTHZ_SERVICE;

/// A config as callers see it.
#[derive(Clone, Debug)]
pub struct Config {
    pub row: vault_config::Model,
    pub credentials_set: bool,
}

/// What an update changes.
#[derive(Default)]
pub struct Change {
    pub name: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
    pub namespace: Option<String>,
    pub ca_certificate: Option<String>,
    pub credentials: Option<pb::VaultCredentials>,
    pub bundle: Option<String>,
}

/// Bounds of the Vault side.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub vault_timeout: Duration,
    pub cache_ttl: Duration,
    pub cache_max_entries: u64,
    pub cache_max_bytes: u64,
    pub database_timeout: Duration,
}

/// A config's version: its id and last change, so replicas never use a
/// connection or values from before a change they did not see.
type Version = (String, i64);

/// The services a config's life goes through, all served by the authz-service.
pub struct Peers {
    pub authz: Arc<dyn Decisions>,
    pub registry: ResourceRegistryClient<InternalChannel>,
    pub usage: Arc<dyn Usages>,
}

#[derive(Clone)]
pub struct Configs {
    db: DatabaseConnection,
    rows: Rows,
    store: Arc<GroupCommit<Error>>,
    prefix: String,
    authz: Arc<dyn Decisions>,
    registry: ResourceRegistryClient<InternalChannel>,
    usage: Arc<dyn Usages>,
    limits: Limits,
    connections: Cache<Version, Arc<Connection>>,
    values: Cache<Version, Arc<Fields>>,
    metrics: secrets_common::observe::Metrics,
}

fn version(row: &vault_config::Model) -> Version {
    (row.id.clone(), row.updated_at.timestamp_millis())
}

/// What a secret's fields take in the value cache, roughly: keys, values
/// and a little for each entry.
fn weight(fields: &Fields) -> usize {
    fields.iter().map(|(k, v)| k.len() + v.len() + 64).sum()
}

/// The same answer for a config that does not exist and one the caller
/// may not see.
fn not_found(id: &str) -> Error {
    Error::NotFound(format!("vault config {id} does not exist (or you may not see it)"))
}

fn label(row: &vault_config::Model) -> String {
    format!("vault config {:?} ({})", row.name, row.id)
}

impl Configs {
    /// The rows in memory.
    pub fn rows(&self) -> &Rows {
        &self.rows
    }

    pub fn new(
        db: DatabaseConnection,
        store: Arc<dyn StoreBackend<Error>>,
        prefix: String,
        peers: Peers,
        limits: Limits,
        metrics: secrets_common::observe::Metrics,
    ) -> Self {
        let Peers { authz, registry, usage } = peers;
        let store = Arc::new(GroupCommit::new(store, Some(metrics.clone())));
        let rows = Rows::start(db.clone(), limits.database_timeout);
        // Bounded in bytes: a few large secrets cannot take the memory that
        // many small ones would be allowed.
        let values = Cache::builder()
            .weigher(|_, fields: &Arc<Fields>| u32::try_from(weight(fields)).unwrap_or(u32::MAX))
            .max_capacity(limits.cache_max_bytes)
            .time_to_live(limits.cache_ttl)
            .build();
        // An idle connection goes (and with it its token renewals).
        let connections = Cache::builder()
            .max_capacity(limits.cache_max_entries)
            .time_to_idle(std::time::Duration::from_secs(600))
            .build();
        Self { db, rows, store, prefix, authz, registry, usage, limits, connections, values, metrics }
    }

    /// The store object holding a domain's Vault credentials.
    pub fn credentials_object(&self, domain: &str) -> String {
        format!("{}-{domain}", self.prefix)
    }

    async fn db<T>(&self, f: impl Future<Output = Result<T, sea_orm::DbErr>>) -> Result<T> {
        let operation = async { f.await.map_err(Error::from) };
        secrets_db::bounded(&self.db, self.limits.database_timeout, operation, |e| {
            // Two writers raced for one name: the unique index decided.
            matches!(e.sql_err(), Some(sea_orm::SqlErr::UniqueConstraintViolation(_)))
                .then(|| Error::AlreadyExists("the domain has a vault config with that name already".into()))
        })
        .await
    }

    /// Ok when the principal may do `permission` on the config. One who
    /// may not VIEW it is told it does not exist, exactly as for an id that
    /// names nothing, so a denial reveals neither the config's name nor that
    /// the id is in use. (USE alone lets a principal list and resolve the
    /// config's keys, never see its details.) One round trip.
    async fn require(&self, principal: &Acting, permission: Permission, id: &str, action: &str) -> Result<()> {
        let ask = |p: Permission| Question::vault_config(principal, p, id).with_groups(&principal.groups);
        let mut questions = vec![ask(Permission::View)];
        if permission != Permission::View {
            questions.push(ask(permission));
        }
        let answers = self.authz.batch_check(&questions).await?;
        let allowed = |p: Permission| questions.iter().zip(&answers).find(|(q, _)| q.permission == p).map(|(_, a)| a);
        let (Some(view), Some(wanted)) = (allowed(Permission::View), allowed(permission)) else {
            return Err(Error::Internal("the authz-service answered fewer questions than asked".into()));
        };
        if wanted.allowed {
            return Ok(());
        }
        if !view.allowed {
            return Err(not_found(id));
        }
        Err(Error::PermissionDenied(format!("{} may not {action}: {}", principal.principal, wanted.reason)))
    }

    async fn row(&self, id: &str) -> Result<vault_config::Model> {
        validate_id(id)?;
        self.db(vault_config::Entity::find_by_id(id.to_string()).one(&self.db)).await?.ok_or_else(|| not_found(id))
    }

    async fn name_taken(&self, domain: &str, name: &str, except: Option<&str>) -> Result<bool> {
        let rows = self
            .db(vault_config::Entity::find()
                .filter(vault_config::Column::Domain.eq(domain))
                .filter(vault_config::Column::Name.eq(name))
                .all(&self.db))
            .await?;
        Ok(rows.iter().any(|r| Some(r.id.as_str()) != except))
    }

    async fn credentials_of(&self, row: &vault_config::Model) -> Result<Option<Credentials>> {
        let entries = self.store.read_current(&self.credentials_object(&row.domain)).await?.unwrap_or_default();
        entries
            .get(&row.id)
            .map(|e| {
                Credentials::from_json(e.value.expose())
                    .map_err(|_| Error::Internal(format!("the stored credentials of {} are not readable", label(row))))
            })
            .transpose()
    }

    async fn put_credentials(&self, domain: &str, id: &str, credentials: &Credentials) -> Result<()> {
        let json = credentials.to_json().map_err(|e| Error::Internal(format!("cannot encode credentials: {e}")))?;
        let value = SecretValue::new(json.to_vec());
        let now = Utc::now().trunc_subsecs(3);
        let id = id.to_string();
        self.store
            .apply(&self.credentials_object(domain), move |entries: &mut Entries| {
                let created_at = entries.get(&id).map_or(now, |e| e.created_at);
                entries.insert(id.clone(), Entry { value: value.clone(), created_at, updated_at: now });
                Ok(())
            })
            .await
    }

    async fn remove_credentials(&self, domain: &str, id: &str) -> Result<()> {
        let object = self.credentials_object(domain);
        if self.store.read_shared(&object).await?.is_none_or(|e| !e.contains_key(id)) {
            return Ok(());
        }
        let id = id.to_string();
        self.store
            .apply(&object, move |entries: &mut Entries| {
                entries.remove(&id);
                Ok(())
            })
            .await
    }

    fn registry_request<T>(principal: &Acting, message: T) -> Request<T> {
        let mut request = Request::new(message);
        act_as(&mut request, principal, None, &principal.groups);
        request
    }

    fn resource(id: &str) -> pb::Resource {
        pb::Resource { r#type: pb::ResourceType::VaultConfig as i32, id: id.to_string() }
    }

    /// Creates a config: the authz service places it in its bundle (which
    /// checks that the principal owns the domain, or is a platform admin,
    /// and may manage the bundle), its credentials go to the domain's store
    /// object, its row to the database.
    pub async fn create(
        &self,
        principal: &Acting,
        domain: &str,
        bundle: &str,
        spec: &pb::VaultConfigSpec,
    ) -> Result<Config> {
        let mut problems = Vec::new();
        if let Err(v) = validate::domain("domain", domain) {
            problems.push(v);
        }
        if bundle.is_empty() {
            problems.push(FieldViolation::new("bundle", "is required: the resource bundle that controls access"));
        }
        let target = spec::target(spec, "spec.").map_err(|v| problems.extend(v)).ok();
        let credentials =
            spec::credentials("spec.credentials", spec.credentials.as_ref()).map_err(|v| problems.push(v)).ok();
        let (Some(target), Some(credentials)) = (target, credentials) else {
            return Err(Error::InvalidArgument(problems));
        };
        if !problems.is_empty() {
            return Err(Error::InvalidArgument(problems));
        }
        check_ca(&target, &credentials, self.limits.vault_timeout)?;
        if self.name_taken(domain, &spec.name, None).await? {
            return Err(Error::AlreadyExists(format!(
                "domain {domain:?} has a vault config named {:?} already",
                spec.name
            )));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let register = internal::RegisterResourceRequest {
            resource: Some(Self::resource(&id)),
            bundle: bundle.to_string(),
            domain: domain.to_string(),
        };
        self.registry
            .clone()
            .register_resource(Self::registry_request(principal, register))
            .await
            .map_err(|s| from_upstream(AUTHZ, s))?;
        let now = Utc::now().trunc_subsecs(3);
        let row = vault_config::Model {
            id: id.clone(),
            domain: domain.to_string(),
            name: spec.name.clone(),
            bundle: bundle.to_string(),
            host: target.host.clone(),
            path: spec.path.clone(),
            namespace: target.namespace.clone().unwrap_or_default(),
            ca_certificate: target.ca_certificate.clone().unwrap_or_default(),
            auth_method: method_name(&credentials).into(),
            created_at: now,
            updated_at: now,
        };
        let saved = async {
            self.put_credentials(domain, &id, &credentials).await?;
            let active: vault_config::ActiveModel = row.clone().into();
            let change = self.rows.changing(&id);
            self.db(async {
                let txn = self.db.begin().await?;
                vault_config::Entity::insert(active).exec_without_returning(&txn).await?;
                self.rows.notify(&txn, &change).await?;
                txn.commit().await
            })
            .await?;
            Ok::<_, Error>(change)
        }
        .await;
        let change = match saved {
            Ok(change) => change,
            Err(e) => {
                // Leave nothing behind: the credentials and the placement go too.
                let _ = self.remove_credentials(domain, &id).await;
                let unregister = internal::UnregisterResourceRequest { resource: Some(Self::resource(&id)) };
                let _ = self.registry.clone().unregister_resource(Self::registry_request(principal, unregister)).await;
                return Err(e);
            }
        };
        tracing::info!(id = %id, %domain, %bundle, name = %spec.name, %principal, "vault config created");
        // Saved: from here an error only says another replica may not have it yet.
        self.rows.changed(change).await?;
        Ok(Config { row, credentials_set: true })
    }

    pub async fn get(&self, principal: &Acting, id: &str) -> Result<Config> {
        let row = self.row(id).await?;
        self.require(principal, Permission::View, id, &format!("see {}", label(&row))).await?;
        let credentials_set = self.credentials_of(&row).await?.is_some();
        Ok(Config { row, credentials_set })
    }

    /// The domain's configs the principal may VIEW (the rest are left out).
    pub async fn list(&self, principal: &Acting, domain: &str) -> Result<Vec<Config>> {
        validate::domain("domain", domain)?;
        let rows = self
            .db(vault_config::Entity::find()
                .filter(vault_config::Column::Domain.eq(domain))
                .order_by_asc(vault_config::Column::Name)
                .all(&self.db))
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let questions: Vec<Question> = rows
            .iter()
            .map(|r| Question::vault_config(principal, Permission::View, &r.id).with_groups(&principal.groups))
            .collect();
        let answers = self.authz.batch_check(&questions).await?;
        let stored = self.store.read(&self.credentials_object(domain)).await?.unwrap_or_default();
        Ok(rows
            .into_iter()
            .zip(answers)
            .filter(|(_, a)| a.allowed)
            .map(|(row, _)| Config { credentials_set: stored.contains_key(&row.id), row })
            .collect())
    }

    pub async fn update(&self, principal: &Acting, id: &str, change: Change) -> Result<Config> {
        let row = self.row(id).await?;
        self.require(principal, Permission::Update, id, &format!("change {}", label(&row))).await?;
        if let Some(bundle) = change.bundle.as_deref().filter(|b| *b != row.bundle) {
            return Err(Error::FailedPrecondition(format!(
                "the resource bundle of {} is {} and is fixed at creation; it cannot become {bundle:?}: create a new vault config in that bundle instead",
                label(&row),
                row.bundle
            )));
        }
        let spec = pb::VaultConfigSpec {
            name: change.name.clone().unwrap_or_else(|| row.name.clone()),
            host: change.host.clone().unwrap_or_else(|| row.host.clone()),
            path: change.path.clone().unwrap_or_else(|| row.path.clone()),
            namespace: change.namespace.clone().unwrap_or_else(|| row.namespace.clone()),
            ca_certificate: change.ca_certificate.clone().unwrap_or_else(|| row.ca_certificate.clone()),
            credentials: None,
        };
        let target = spec::target(&spec, "").map_err(Error::InvalidArgument)?;
        let moved = destination_changes(&row, &target);
        if !moved.is_empty() && change.credentials.is_none() {
            // The stored credential is bound to where it was given for: an
            // UPDATE holder must not send the owner's token somewhere new.
            return Err(Error::FailedPrecondition(format!(
                "changing the {} of {} changes where its credentials are sent: give the credentials again in the same request (credentials)",
                moved.join(" and "),
                label(&row)
            )));
        }
        let credentials = match &change.credentials {
            Some(c) => Some(spec::credentials("credentials", Some(c))?),
            None => None,
        };
        let current = match &credentials {
            Some(c) => Some(c.clone()),
            None => self.credentials_of(&row).await?,
        };
        if let Some(c) = &current {
            check_ca(&target, c, self.limits.vault_timeout)?;
        }
        if spec.name != row.name && self.name_taken(&row.domain, &spec.name, Some(id)).await? {
            return Err(Error::AlreadyExists(format!(
                "domain {:?} has a vault config named {:?} already",
                row.domain, spec.name
            )));
        }
        if let Some(c) = &credentials {
            self.put_credentials(&row.domain, id, c).await?;
        }
        let mut active: vault_config::ActiveModel = row.clone().into();
        active.name = Set(spec.name.clone());
        active.host = Set(target.host.clone());
        active.path = Set(spec.path.clone());
        active.namespace = Set(target.namespace.clone().unwrap_or_default());
        active.ca_certificate = Set(target.ca_certificate.clone().unwrap_or_default());
        if let Some(c) = &credentials {
            active.auth_method = Set(method_name(c).into());
        }
        // Strictly later than the last change, so caches keyed by it miss.
        let now = Utc::now().trunc_subsecs(3).max(row.updated_at + chrono::Duration::milliseconds(1));
        active.updated_at = Set(now);
        let change = self.rows.changing(id);
        let updated = self
            .db(async {
                let txn = self.db.begin().await?;
                let updated = active.update(&txn).await?;
                self.rows.notify(&txn, &change).await?;
                txn.commit().await?;
                Ok(updated)
            })
            .await?;
        let confirmed = self.rows.changed(change).await;
        self.forget(&row).await;
        confirmed?;
        tracing::info!(id = %id, credentials_replaced = credentials.is_some(), %principal, "vault config updated");
        Ok(Config { row: updated, credentials_set: current.is_some() })
    }

    /// Removes the integration (row, credentials, placement); never data in Vault.
    /// Deletes the integration (never data in Vault). Refused while saved
    /// workloads reference the config, unless `force`; then the answer names
    /// the workloads now broken.
    pub async fn delete(&self, principal: &Acting, id: &str, force: bool) -> Result<Option<pb::BrokenWorkloads>> {
        let row = self.row(id).await?;
        self.require(principal, Permission::Update, id, &format!("delete {}", label(&row))).await?;
        let usages = internal::FindUsagesRequest {
            source_type: pb::SourceType::Vault as i32,
            source_id: id.to_string(),
            ..Default::default()
        };
        let broken = self.usage.guard_delete(&label(&row), usages, force).await?;
        let change = self.rows.changing(id);
        self.db(async {
            let txn = self.db.begin().await?;
            vault_config::Entity::delete_by_id(id.to_string()).exec(&txn).await?;
            self.rows.notify(&txn, &change).await?;
            txn.commit().await
        })
        .await?;
        let confirmed = self.rows.changed(change).await;
        self.remove_credentials(&row.domain, id).await?;
        self.forget(&row).await;
        let unregister = internal::UnregisterResourceRequest { resource: Some(Self::resource(id)) };
        if let Err(e) = self.registry.clone().unregister_resource(Self::registry_request(principal, unregister)).await {
            tracing::warn!(id = %id, error = %e.message(), "vault config deleted but its bundle placement remains");
        }
        match &broken {
            Some(b) => {
                tracing::warn!(id = %id, %principal, broken = b.total, "vault config deleted by force while workloads reference it")
            }
            None => tracing::info!(id = %id, %principal, "vault config deleted"),
        }
        confirmed?;
        Ok(broken)
    }

    async fn forget(&self, row: &vault_config::Model) {
        self.connections.invalidate(&version(row)).await;
        self.values.invalidate(&version(row)).await;
    }

    /// Tests a saved config (UPDATE) or an unsaved one (domain owner or
    /// platform admin); saves nothing.
    pub async fn test_saved(&self, principal: &Acting, id: &str) -> Result<pb::TestVaultConnectionResponse> {
        let row = self.row(id).await?;
        self.require(principal, Permission::Update, id, &format!("test {}", label(&row))).await?;
        let connection = self.connection(&row).await.map_err(Error::from)?;
        let tested = connection.test().await;
        if let Err(f) = &tested {
            self.refused(&row, f).await;
        }
        Ok(outcome(tested))
    }

    /// Vault refused the credentials or the path: what was read with them
    /// is not served from memory any more.
    async fn refused(&self, row: &vault_config::Model, failure: &VaultFailure) {
        use crate::vault::FailureKind::{InvalidCredentials, NoAccessToPath};
        if matches!(failure.kind, InvalidCredentials | NoAccessToPath) {
            self.values.invalidate(&version(row)).await;
        }
    }

    pub async fn test_unsaved(
        &self,
        principal: &Acting,
        domain: &str,
        spec: &pb::VaultConfigSpec,
    ) -> Result<pb::TestVaultConnectionResponse> {
        validate::domain("unsaved.domain", domain)?;
        let target = spec::target(spec, "unsaved.spec.").map_err(Error::InvalidArgument)?;
        let credentials = spec::credentials("unsaved.spec.credentials", spec.credentials.as_ref())?;
        self.authz
            .require(
                Question::domain(principal, Permission::ManageDomainAccess, Some(domain))
                    .with_groups(&principal.groups),
                &format!("test vault configs of domain {domain:?} (domain owners and platform admins)"),
            )
            .await?;
        let connection = Connection::new(target, credentials, self.limits.vault_timeout).map_err(invalid_ca)?;
        Ok(outcome(connection.test().await))
    }

    /// The keys (field names) the config's secret offers: needs USE.
    pub async fn keys(&self, principal: &Acting, id: &str) -> Result<Vec<String>> {
        let row = self.row(id).await?;
        self.require(principal, Permission::Use, id, &format!("list the keys of {}", label(&row))).await?;
        let fields = self.fields(&row).await.map_err(|f| Error::from(f.context(&label(&row))))?;
        Ok(fields.keys().cloned().collect())
    }

    /// The config's connection to Vault (shared with the resolver: one
    /// token, one login), for the change detection.
    pub(crate) async fn connection_for(&self, row: &vault_config::Model) -> Result<Arc<Connection>> {
        Ok(self.connection(row).await?)
    }

    /// Drops the config's values from memory: the next resolve reads Vault.
    pub(crate) async fn forget_values(&self, row: &vault_config::Model) {
        self.values.invalidate(&version(row)).await;
    }

    async fn connection(&self, row: &vault_config::Model) -> Result<Arc<Connection>, Unbuilt> {
        let build = async {
            let credentials = self.credentials_of(row).await?.ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "{} has no stored credentials; set them with UpdateVaultConfig",
                    label(row)
                ))
            })?;
            let spec = pb::VaultConfigSpec {
                name: row.name.clone(),
                host: row.host.clone(),
                path: row.path.clone(),
                namespace: row.namespace.clone(),
                ca_certificate: row.ca_certificate.clone(),
                credentials: None,
            };
            let target = spec::target(&spec, "")
                .map_err(|v| Error::Internal(format!("stored {} is invalid: {v:?}", label(row))))?;
            let connection = Connection::new(target, credentials, self.limits.vault_timeout)
                .map_err(|f| Unbuilt::Vault(f.context(&label(row))))?;
            let connection = Arc::new(connection);
            // Credentials Vault refuses while renewing: the values read with
            // them are not served from memory any more.
            let (values, key) = (self.values.clone(), version(row));
            connection.keep_fresh(move || {
                let (values, key) = (values.clone(), key.clone());
                tokio::spawn(async move { values.invalidate(&key).await });
            });
            Ok::<_, Unbuilt>(connection)
        };
        self.connections.try_get_with(version(row), build).await.map_err(|e| match Arc::try_unwrap(e) {
            Ok(e) => e,
            Err(shared) => Unbuilt::Other(Error::Internal(shared.to_string())),
        })
    }

    /// The secret's fields: from memory while fresh, else one Vault read
    /// however many callers ask at once.
    async fn fields(&self, row: &vault_config::Model) -> Result<Arc<Fields>, VaultFailure> {
        let connection = self.connection(row).await.map_err(|e| match e {
            Unbuilt::Vault(f) => f,
            Unbuilt::Other(other) => {
                VaultFailure { kind: crate::vault::FailureKind::Other, message: other.to_string() }
            }
        })?;
        let metrics = self.metrics.clone();
        let fields = self
            .values
            .try_get_with(version(row), async move {
                // Counted as a backend call of "vault": what reached Vault.
                let start = std::time::Instant::now();
                let read = connection.read().await;
                metrics.observe_backend("vault", "read", read.is_ok(), start.elapsed());
                read.map(Arc::new)
            })
            .await
            .map_err(|e| (*e).clone())?;
        // A secret larger than the whole cache is not kept (the cache would
        // only evict it later).
        if weight(&fields) as u64 > self.limits.cache_max_bytes {
            self.values.invalidate(&version(row)).await;
        }
        Ok(fields)
    }

    /// Values for the resolver (which has checked USE): per lookup a value,
    /// an error, or withheld past `max_bytes` (every value, with
    /// `presence_only`). One Vault read per config.
    pub async fn read(
        &self,
        lookups: &[internal::VaultLookup],
        max_bytes: u64,
        presence_only: bool,
    ) -> Result<Vec<internal::VaultLookupResult>> {
        use internal::vault_lookup_result::Result as R;
        let mut rows: BTreeMap<String, Option<vault_config::Model>> = BTreeMap::new();
        for l in lookups {
            if !rows.contains_key(&l.config_id) {
                let row = match validate_id(&l.config_id) {
                    // From memory: a resolve sends no query.
                    Ok(()) => self.rows.get(&l.config_id).await?,
                    Err(_) => None,
                };
                rows.insert(l.config_id.clone(), row);
            }
        }
        let mut fetched: BTreeMap<String, Result<Arc<Fields>, VaultFailure>> = BTreeMap::new();
        let reads = rows.iter().filter_map(|(id, row)| row.as_ref().map(|r| (id.clone(), r.clone())));
        let results = futures::future::join_all(reads.map(|(id, row)| async move {
            let fields = self.fields(&row).await.map_err(|f| f.context(&label(&row)));
            (id, fields)
        }))
        .await;
        fetched.extend(results);
        let budget = if max_bytes == 0 { u64::MAX } else { max_bytes };
        let mut sent = 0u64;
        Ok(lookups
            .iter()
            .map(|l| {
                let status = |s: tonic::Status| R::Error(secrets_common::error::to_rpc_status(&s));
                let result = match (rows.get(&l.config_id).and_then(Option::as_ref), fetched.get(&l.config_id)) {
                    (None, _) | (_, None) => {
                        status(tonic::Status::not_found(format!("vault config {} does not exist", l.config_id)))
                    }
                    (Some(_), Some(Err(f))) => status(f.status()),
                    (Some(row), Some(Ok(fields))) => match fields.get(&l.key) {
                        None => status(tonic::Status::not_found(format!(
                            "{} has no key {:?} at {}",
                            label(row),
                            l.key,
                            row.path
                        ))),
                        Some(v) if presence_only || sent.saturating_add(v.len() as u64) > budget => R::Withheld(true),
                        Some(v) => {
                            sent += v.len() as u64;
                            R::Value(v.expose().to_vec())
                        }
                    },
                };
                internal::VaultLookupResult { result: Some(result) }
            })
            .collect())
    }
}

impl Configs {
    /// The configs of a domain, id and name (the caller checks permissions).
    pub async fn of_domain(&self, domain: &str) -> Result<Vec<(String, String)>> {
        validate::domain("domain", domain)?;
        let rows = self
            .db(vault_config::Entity::find()
                .filter(vault_config::Column::Domain.eq(domain))
                .order_by_asc(vault_config::Column::Name)
                .all(&self.db))
            .await?;
        Ok(rows.into_iter().map(|r| (r.id, r.name)).collect())
    }

    /// The keys of each config (the caller has checked USE), read
    /// concurrently: per config its keys or why they could not be read.
    pub async fn keys_of(&self, ids: &[String]) -> Vec<internal::ConfigKeys> {
        let reads = ids.iter().map(|id| async move {
            let result = async {
                validate_id(id)?;
                let row = self.rows.get(id).await?.ok_or_else(|| not_found(id))?;
                let fields = self.fields(&row).await.map_err(|f| Error::from(f.context(&label(&row))))?;
                Ok::<_, Error>(fields.keys().cloned().collect::<Vec<_>>())
            }
            .await;
            match result {
                Ok(keys) => internal::ConfigKeys { config_id: id.clone(), keys, error: None },
                Err(e) => internal::ConfigKeys {
                    config_id: id.clone(),
                    keys: Vec::new(),
                    error: Some(secrets_common::error::to_rpc_status(&tonic::Status::from(e))),
                },
            }
        });
        futures::future::join_all(reads).await
    }
}

/// The fields of `target` that send a config's credentials somewhere other
/// than the stored row does: the server, the namespace, or the CA that
/// decides which server is trusted. (The AppRole mount is part of the
/// credentials and changes only with them.)
fn destination_changes(row: &vault_config::Model, target: &Target) -> Vec<&'static str> {
    let mut moved = Vec::new();
    if target.host != row.host {
        moved.push("host");
    }
    if target.namespace.as_deref().unwrap_or_default() != row.namespace {
        moved.push("namespace");
    }
    if target.ca_certificate.as_deref().unwrap_or_default() != row.ca_certificate {
        moved.push("ca_certificate");
    }
    moved
}

fn method_name(c: &Credentials) -> &'static str {
    match c {
        Credentials::Token { .. } => "TOKEN",
        Credentials::AppRole { .. } => "APP_ROLE",
    }
}

pub fn method_of(name: &str) -> pb::VaultAuthMethod {
    match name {
        "TOKEN" => pb::VaultAuthMethod::Token,
        "APP_ROLE" => pb::VaultAuthMethod::AppRole,
        _ => pb::VaultAuthMethod::Unspecified,
    }
}

/// Why a config's connection could not be built: Vault's answer, whose
/// kind the resolver reports per item, or another failure.
#[derive(Debug, thiserror::Error)]
enum Unbuilt {
    #[error(transparent)]
    Vault(VaultFailure),
    #[error(transparent)]
    Other(#[from] Error),
}

impl From<Unbuilt> for Error {
    fn from(e: Unbuilt) -> Self {
        match e {
            Unbuilt::Vault(f) => f.into(),
            Unbuilt::Other(e) => e,
        }
    }
}

/// Config ids are what this service generates: UUIDs.
fn validate_id(id: &str) -> Result<()> {
    Ok(secrets_common::validate::vault_config_id("id", id)?)
}

/// A CA certificate that cannot be used is the caller's mistake.
fn invalid_ca(f: VaultFailure) -> Error {
    FieldViolation::new("ca_certificate", f.message).into()
}

fn check_ca(target: &Target, credentials: &Credentials, timeout: Duration) -> Result<()> {
    Connection::new(target.clone(), credentials.clone(), timeout).map(drop).map_err(invalid_ca)
}

fn outcome(result: Result<usize, VaultFailure>) -> pb::TestVaultConnectionResponse {
    match result {
        Ok(keys) => pb::TestVaultConnectionResponse {
            outcome: pb::VaultConnectionOutcome::ConnectionOk as i32,
            message: format!("connected; the secret has {keys} key{}", if keys == 1 { "" } else { "s" }),
            key_count: keys as u32,
        },
        Err(f) => pb::TestVaultConnectionResponse { outcome: f.outcome() as i32, message: f.message, key_count: 0 },
    }
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}
