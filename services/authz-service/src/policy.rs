//! The grants in the database, and the queries behind every decision. The
//! rules themselves are in [`crate::rules`].
//!
//! Decisions come from an in-memory copy of the grant tables, used only
//! while it is current. On SQLite, which one process owns, this process's
//! changes mark the copy old. On PostgreSQL, where replicas share the
//! grants, every change bumps a counter (by triggers, in its transaction)
//! and is announced to every replica ([`secrets_db::replicas`]); a replica
//! that is serving among the others knows the newest version without a
//! query, and one that is not reads the counter for each batch of checks.
//! A reload follows a change. So no decision is
//! served from before a change that has returned. Every database call is
//! bounded by the configured timeout, so a database that stops answering
//! turns into `UNAVAILABLE` naming the database at once.

use std::{collections::BTreeSet, future::Future, sync::Arc, time::Duration};

use chrono::Utc;
use futures::future::BoxFuture;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, Set, SqlErr, Statement, TransactionTrait, sea_query::OnConflict,
};
use secrets_common::{Principal, observe::Metrics};
use tracing::Instrument;

pub use crate::rules::{Check, Decision, Permission, ResourceType, Role, Target};
use crate::{
    Error, Result,
    db::{
        bundle, bundle_grant, bundle_resource, domain_member, domain_permission, group, group_member, platform_admin,
    },
    grants::Grants,
    rules::{self, Placement},
    writer::Writer,
};

/// An arbitrary constant naming the lock that serializes changes to group
/// nesting on PostgreSQL, so two concurrent additions cannot close a cycle
/// that neither saw.
const GROUP_EDGES_LOCK_ID: i64 = 0x1075_ec12_a07c;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub description: String,
    pub members: Vec<Principal>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    pub name: String,
    pub description: String,
    pub owner: Principal,
    pub grants: Vec<(Principal, Permission)>,
    pub resources: Vec<(ResourceType, String)>,
}

/// What an update of a bundle changes.
#[derive(Clone, Debug, Default)]
pub struct BundleChange {
    pub description: Option<String>,
    pub owner: Option<Principal>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub domain: String,
    pub subject: Principal,
    pub role: Role,
    pub permissions: BTreeSet<Permission>,
}

#[derive(Clone)]
pub struct Policy {
    db: DatabaseConnection,
    /// Admins named in configuration: always admins, never revocable here.
    bootstrap_admins: BTreeSet<Principal>,
    /// Bound on each database operation.
    timeout: Duration,
    /// The grant tables as of a version of the change counter.
    grants: std::sync::Arc<std::sync::RwLock<Option<std::sync::Arc<Grants>>>>,
    /// One reload at a time.
    reloading: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Bumped after every change this process makes. On SQLite, which one
    /// process owns (see [`crate::db::lock_sqlite`]), it is the version of
    /// the grants, and a decision costs no query at all.
    local: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The gateways' decision leases, which every change waits on.
    leases: secrets_common::leases::Leases,
    /// Every change to the database goes through it.
    writer: Writer,
    /// PostgreSQL: the other replicas, which every change waits on too.
    replicas: Option<secrets_db::replicas::Replicas>,
    /// PostgreSQL: the newest version of the grants this replica knows of
    /// (its own changes and those announced by the others). While the
    /// replica is serving, the copy is current when it is at least this.
    known: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// Applies the grant changes other replicas announce: the copy in memory
/// is old from then on, and no gateway may answer from before them once
/// they are confirmed.
struct Announced {
    db: DatabaseConnection,
    known: std::sync::Arc<std::sync::atomic::AtomicI64>,
    leases: secrets_common::leases::Leases,
}

impl secrets_db::replicas::Keeper for Announced {
    fn reload(&self) -> BoxFuture<'_, std::result::Result<i64, secrets_common::error::Error>> {
        Box::pin(async move {
            let version = secrets_db::replicas::Replicas::version_in(&crate::db::REPLICAS, &self.db).await?;
            self.known.fetch_max(version, std::sync::atomic::Ordering::SeqCst);
            // Changes may have gone by unseen: no holder may answer from
            // before them.
            self.leases.publish().await;
            Ok(version)
        })
    }

    fn apply<'a>(
        &'a self,
        version: i64,
        _what: &'a str,
    ) -> BoxFuture<'a, std::result::Result<(), secrets_common::error::Error>> {
        self.known.fetch_max(version, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.leases.publish())
    }
}

fn parse_subject(text: &str) -> Result<Principal> {
    Principal::parse_subject("subject", text).map_err(|e| Error::Internal(format!("a stored subject is invalid: {e}")))
}

fn parse_role(text: &str) -> Result<Role> {
    Role::parse(text).ok_or_else(|| {
        Error::Internal(format!("a stored domain role is {text:?}; only \"owner\" and \"member\" are understood"))
    })
}

/// A change that must be published: by [`Publication::publish`], or when
/// dropped unpublished (its task stopped early: a panic, the runtime going
/// away), in a task of its own.
pub struct Publication {
    pending: Option<(secrets_common::leases::Leases, std::sync::Arc<std::sync::atomic::AtomicU64>)>,
    /// The bound on a database operation: a write whose caller stopped
    /// waiting has landed or failed by then.
    settle: Duration,
}

impl Publication {
    /// Publishes now and, when the write may still be landing (it failed,
    /// timed out, or its request went away), once more after `settle`: a
    /// check answered in between cannot outlive the write.
    fn start(
        leases: secrets_common::leases::Leases,
        local: std::sync::Arc<std::sync::atomic::AtomicU64>,
        again_after: Option<Duration>,
    ) -> tokio::task::JoinHandle<()> {
        // Detached: cancelling the request that waits on it does not stop it.
        let publish = |leases: secrets_common::leases::Leases, local: std::sync::Arc<std::sync::atomic::AtomicU64>| async move {
            local.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            leases.publish().await;
        };
        let first = tokio::spawn(publish(leases.clone(), local.clone()));
        if let Some(settle) = again_after {
            tokio::spawn(async move {
                tokio::time::sleep(settle).await;
                publish(leases, local).await;
            });
        }
        first
    }

    /// Publishes the change; returns once no gateway can answer from before
    /// it. `failed`: the write may land after this returns.
    pub async fn publish(mut self, failed: bool) {
        if let Some((leases, local)) = self.pending.take() {
            let _ = Self::start(leases, local, failed.then_some(self.settle)).await;
        }
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        if let Some((leases, local)) = self.pending.take() {
            tracing::info!("a grant change ended before it was published; publishing it anyway");
            Self::start(leases, local, Some(self.settle));
        }
    }
}

impl Policy {
    pub fn new(
        db: DatabaseConnection,
        bootstrap_admins: BTreeSet<Principal>,
        timeout: Duration,
        metrics: Option<Metrics>,
    ) -> Self {
        let known = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (leases, replicas) = if db.get_database_backend() == DbBackend::Postgres {
            let leases = secrets_common::leases::Leases::new("decision");
            let keeper = Announced { db: db.clone(), known: known.clone(), leases: leases.clone() };
            let replicas = secrets_db::replicas::Replicas::start(db.clone(), crate::db::REPLICAS, Arc::new(keeper));
            // A holder is answered only while this replica's own lease
            // outlasts the holder's: a replica cut off from the database
            // stops answering before the others stop waiting for it.
            let guard = replicas.clone();
            (leases.with_guard(move |lease| guard.serving_for().is_some_and(|left| left >= lease)), Some(replicas))
        } else {
            (secrets_common::leases::Leases::new("decision"), None)
        };
        Self {
            leases,
            writer: Writer::new(db.clone(), timeout, metrics),
            db,
            bootstrap_admins,
            timeout,
            grants: Default::default(),
            reloading: Default::default(),
            local: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1)),
            replicas,
            known,
        }
    }

    /// Stops taking part among the replicas (the service is stopping):
    /// gives no more leases, answers from the database, and leaves, so
    /// changes stop waiting for this replica at once.
    pub async fn stop(&self) {
        self.leases.stop();
        if let Some(replicas) = &self.replicas {
            replicas.leave().await;
        }
    }

    /// Taken before a change is written: publishing it (marking the grants
    /// in memory as old, and waiting until no gateway can answer from
    /// before the change) then happens whatever becomes of the write. A
    /// database timeout that fires after the commit cannot leave a change
    /// unpublished.
    fn publication(&self) -> Publication {
        Publication { pending: Some((self.leases.clone(), self.local.clone())), settle: self.timeout }
    }

    /// The decision leases served to gateways.
    pub fn leases(&self) -> secrets_common::leases::Leases {
        self.leases.clone()
    }

    /// Whether other processes may change the grants (PostgreSQL): then the
    /// change counter in the database decides what is current.
    fn shared(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Postgres
    }

    fn local_version(&self) -> i64 {
        self.local.load(std::sync::atomic::Ordering::SeqCst) as i64
    }

    /// The change counter: one indexed read.
    async fn version(&self) -> Result<i64> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT version FROM authz_changes WHERE id = 1",
            ))
            .await?
            .ok_or_else(|| Error::Internal("the authz_changes row is missing".into()))?;
        Ok(row.try_get("", "version")?)
    }

    /// Every grant table, and the counter they belong to, from one
    /// consistent snapshot of the database.
    async fn load_grants(&self) -> Result<Grants> {
        // SQLite's transactions read one snapshot already; PostgreSQL's
        // default (read committed) would give each statement its own.
        let txn = match self.db.get_database_backend() {
            DbBackend::Postgres => {
                self.db
                    .begin_with_config(
                        Some(sea_orm::IsolationLevel::RepeatableRead),
                        Some(sea_orm::AccessMode::ReadOnly),
                    )
                    .await?
            }
            _ => self.db.begin().await?,
        };
        let row = txn
            .query_one_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT version FROM authz_changes WHERE id = 1",
            ))
            .await?
            .ok_or_else(|| Error::Internal("the authz_changes row is missing".into()))?;
        let mut g = Grants { version: row.try_get("", "version")?, ..Grants::default() };
        for a in platform_admin::Entity::find().all(&txn).await? {
            g.admins.insert(parse_subject(&a.subject)?);
        }
        for m in group_member::Entity::find().all(&txn).await? {
            g.parents.entry(m.member).or_default().push(m.group_name);
        }
        for m in domain_member::Entity::find().all(&txn).await? {
            match parse_subject(&m.subject).and_then(|s| Ok((s, parse_role(&m.role)?))) {
                Ok(row) => g.roles.entry(m.domain).or_default().push(row),
                Err(e) => g.broken.entry(m.domain).or_default().push((m.subject, e.to_string())),
            }
        }
        for p in domain_permission::Entity::find().all(&txn).await? {
            match parse_subject(&p.subject) {
                Ok(subject) => {
                    if let Some(permission) = Permission::from_grant_name(&p.permission) {
                        g.permissions.entry(p.domain).or_default().push((subject, permission));
                    }
                }
                Err(e) => g.broken.entry(p.domain).or_default().push((p.subject, e.to_string())),
            }
        }
        for b in bundle::Entity::find().all(&txn).await? {
            g.bundles.insert(b.name, parse_subject(&b.owner)?);
        }
        for b in bundle_grant::Entity::find().all(&txn).await? {
            if let Some(permission) = Permission::from_bundle_grant_name(&b.permission) {
                g.bundle_grants.entry(b.bundle).or_default().push((parse_subject(&b.subject)?, permission));
            }
        }
        for r in bundle_resource::Entity::find().all(&txn).await? {
            if let Some(kind) = ResourceType::from_name(&r.resource_type) {
                g.resources
                    .entry(r.resource_id)
                    .or_default()
                    .push((kind, Placement { bundle: r.bundle, domain: r.domain }));
            }
        }
        txn.commit().await?;
        Ok(g)
    }

    /// The grants as of `version` or later: the copy in memory when it is
    /// that current, else reloaded.
    async fn current_grants(&self) -> Result<std::sync::Arc<Grants>> {
        let version = match &self.replicas {
            // Every change another replica confirmed has been announced here.
            Some(replicas) if replicas.serving() => self.known.load(std::sync::atomic::Ordering::SeqCst),
            _ if self.shared() => self.version().await?,
            _ => self.local_version(),
        };
        let fresh = |slot: &Option<std::sync::Arc<Grants>>| slot.as_ref().filter(|g| g.version >= version).cloned();
        if let Some(g) = fresh(&self.grants.read().unwrap_or_else(|e| e.into_inner())) {
            return Ok(g);
        }
        let _one = self.reloading.lock().await;
        if let Some(g) = fresh(&self.grants.read().unwrap_or_else(|e| e.into_inner())) {
            return Ok(g);
        }
        // Taken before loading: a change made meanwhile makes this copy old.
        let local = self.local_version();
        let mut loaded = self.load_grants().await?;
        if !self.shared() {
            loaded.version = local;
        }
        let loaded = std::sync::Arc::new(loaded);
        tracing::debug!(version = loaded.version, "loaded the grants");
        let mut slot = self.grants.write().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|g| g.version < loaded.version) {
            *slot = Some(loaded.clone());
        }
        Ok(loaded)
    }

    /// The database, for the usage index that shares it.
    pub(crate) fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The writer, for the usage index that shares it.
    pub(crate) fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Runs one database operation within the timeout; database failures
    /// become `UNAVAILABLE` naming the database.
    pub(crate) async fn bounded<T>(&self, operation: impl Future<Output = Result<T>>) -> Result<T> {
        secrets_db::bounded(&self.db, self.timeout, operation, |_| None).await
    }

    /// Answers every check, and whether `caller` (if given) is a platform
    /// admin, from the grants in memory (current as of one read of the
    /// change counter).
    pub async fn check_batch(&self, caller: Option<&Principal>, checks: &[Check]) -> Result<(bool, Vec<Decision>)> {
        let mut subjects: BTreeSet<Principal> = checks.iter().map(|c| c.subject.clone()).collect();
        subjects.extend(caller.cloned());
        let grants = self.bounded(self.current_grants()).await?;
        let facts = grants.facts(&self.bootstrap_admins, &subjects, checks)?;
        let caller_is_admin = caller.is_some_and(|c| facts.is_admin(c));
        Ok((caller_is_admin, checks.iter().map(|c| rules::decide(&facts, c)).collect()))
    }

    pub async fn check(&self, subject: &Principal, permission: Permission, target: Target) -> Result<Decision> {
        self.check_with_groups(subject, Vec::new(), permission, target).await
    }

    /// As [`Self::check`], counting `token_groups` (group names from the
    /// subject's identity token) as memberships.
    pub async fn check_with_groups(
        &self,
        subject: &Principal,
        token_groups: Vec<String>,
        permission: Permission,
        target: Target,
    ) -> Result<Decision> {
        let check = Check { subject: subject.clone(), permission, target, token_groups };
        let (_, mut decisions) = self.check_batch(None, std::slice::from_ref(&check)).await?;
        decisions.pop().ok_or_else(|| Error::Internal("a check went unanswered".into()))
    }

    pub async fn is_platform_admin(&self, subject: &Principal) -> Result<bool> {
        Ok(self.check_batch(Some(subject), &[]).await?.0)
    }

    /// Placement of a resource, if registered.
    pub async fn placement(&self, kind: ResourceType, id: &str) -> Result<Option<Placement>> {
        self.bounded(async {
            Ok(crate::db::bundle_resource::Entity::find_by_id((kind.name().to_string(), id.to_string()))
                .one(&self.db)
                .await?
                .map(|r| Placement { bundle: r.bundle, domain: r.domain }))
        })
        .await
    }

    async fn load_member(
        &self,
        db: &impl ConnectionTrait,
        domain: &str,
        subject: &Principal,
    ) -> Result<Option<Member>> {
        let Some(row) = domain_member::Entity::find_by_id((domain.to_string(), subject.to_string())).one(db).await?
        else {
            return Ok(None);
        };
        let permissions = domain_permission::Entity::find()
            .filter(domain_permission::Column::Domain.eq(domain))
            .filter(domain_permission::Column::Subject.eq(subject.to_string()))
            .all(db)
            .await?
            .into_iter()
            .filter_map(|p| Permission::from_grant_name(&p.permission))
            .collect();
        Ok(Some(Member { domain: row.domain, subject: subject.clone(), role: parse_role(&row.role)?, permissions }))
    }

    pub async fn member(&self, domain: &str, subject: &Principal) -> Result<Option<Member>> {
        self.bounded(self.load_member(&self.db, domain, subject)).await
    }

    async fn add_member_now(
        &self,
        db: &DatabaseTransaction,
        domain: &str,
        subject: &Principal,
        role: Role,
    ) -> Result<Member> {
        let row = domain_member::ActiveModel {
            domain: Set(domain.to_string()),
            subject: Set(subject.to_string()),
            role: Set(role.as_str().to_string()),
            created_at: Set(Utc::now()),
        };
        domain_member::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([domain_member::Column::Domain, domain_member::Column::Subject])
                    .update_column(domain_member::Column::Role)
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
        self.load_member(db, domain, subject)
            .await?
            .ok_or_else(|| Error::Internal("member vanished after insert".into()))
    }

    async fn remove_member_now(&self, db: &DatabaseTransaction, domain: &str, subject: &Principal) -> Result<()> {
        let removed = domain_member::Entity::delete_by_id((domain.to_string(), subject.to_string())).exec(db).await?;
        if removed.rows_affected == 0 {
            return Err(Error::NotFound(format!("{subject} is not a member of domain {domain:?}")));
        }
        Ok(())
    }

    async fn grant_now(
        &self,
        db: &DatabaseTransaction,
        domain: &str,
        subject: &Principal,
        permission: Permission,
    ) -> Result<Member> {
        let not_member = || {
            Error::FailedPrecondition(format!(
                "{subject} is not a member of domain {domain:?}; add it with AddDomainMember first"
            ))
        };
        if self.load_member(db, domain, subject).await?.is_none() {
            return Err(not_member());
        }
        let row = domain_permission::ActiveModel {
            domain: Set(domain.to_string()),
            subject: Set(subject.to_string()),
            permission: Set(permission.name().to_string()),
            created_at: Set(Utc::now()),
        };
        let inserted = domain_permission::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([
                    domain_permission::Column::Domain,
                    domain_permission::Column::Subject,
                    domain_permission::Column::Permission,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(db)
            .await;
        match inserted {
            Err(e) if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_))) => {
                return Err(not_member());
            }
            other => other?,
        };
        let member = self.load_member(db, domain, subject).await?.ok_or_else(not_member)?;
        Ok(member)
    }

    async fn revoke_now(
        &self,
        db: &DatabaseTransaction,
        domain: &str,
        subject: &Principal,
        permission: Permission,
    ) -> Result<Member> {
        if self.load_member(db, domain, subject).await?.is_none() {
            return Err(Error::NotFound(format!("{subject} is not a member of domain {domain:?}")));
        }
        domain_permission::Entity::delete_by_id((
            domain.to_string(),
            subject.to_string(),
            permission.name().to_string(),
        ))
        .exec(db)
        .await?;
        let member = self
            .load_member(db, domain, subject)
            .await?
            .ok_or_else(|| Error::Internal("member vanished during revoke".into()))?;
        Ok(member)
    }

    pub async fn members(&self, domain: &str) -> Result<Vec<Member>> {
        self.bounded(async {
            let rows = domain_member::Entity::find()
                .filter(domain_member::Column::Domain.eq(domain))
                .order_by_asc(domain_member::Column::Subject)
                .all(&self.db)
                .await?;
            let perms = domain_permission::Entity::find()
                .filter(domain_permission::Column::Domain.eq(domain))
                .all(&self.db)
                .await?;
            rows.into_iter()
                .map(|row| {
                    let permissions = perms
                        .iter()
                        .filter(|p| p.subject == row.subject)
                        .filter_map(|p| Permission::from_grant_name(&p.permission))
                        .collect();
                    Ok(Member {
                        subject: parse_subject(&row.subject)?,
                        role: parse_role(&row.role)?,
                        domain: row.domain,
                        permissions,
                    })
                })
                .collect()
        })
        .await
    }

    async fn grant_admin_now(&self, db: &DatabaseTransaction, subject: &Principal) -> Result<()> {
        let row = platform_admin::ActiveModel { subject: Set(subject.to_string()), created_at: Set(Utc::now()) };
        platform_admin::Entity::insert(row)
            .on_conflict(OnConflict::column(platform_admin::Column::Subject).do_nothing().to_owned())
            .exec_without_returning(db)
            .await?;
        Ok(())
    }

    async fn revoke_admin_now(&self, db: &DatabaseTransaction, subject: &Principal) -> Result<()> {
        if self.bootstrap_admins.contains(subject) {
            return Err(Error::FailedPrecondition(format!(
                "{subject} is a platform admin by configuration (bootstrap_admins); remove it there"
            )));
        }
        let removed = platform_admin::Entity::delete_by_id(subject.to_string()).exec(db).await?;
        if removed.rows_affected == 0 {
            return Err(Error::NotFound(format!("{subject} is not a platform admin")));
        }
        Ok(())
    }

    /// Every admin: `(subject, from_configuration)`.
    pub async fn admins(&self) -> Result<Vec<(Principal, bool)>> {
        let rows = self
            .bounded(async {
                Ok(platform_admin::Entity::find().order_by_asc(platform_admin::Column::Subject).all(&self.db).await?)
            })
            .await?;
        let mut all: Vec<(Principal, bool)> = self.bootstrap_admins.iter().map(|p| (p.clone(), true)).collect();
        for row in rows {
            let p = parse_subject(&row.subject)?;
            if !self.bootstrap_admins.contains(&p) {
                all.push((p, false));
            }
        }
        Ok(all)
    }

    // Groups.

    async fn load_group(&self, db: &impl ConnectionTrait, name: &str) -> Result<Option<Group>> {
        let Some(row) = group::Entity::find_by_id(name.to_string()).one(db).await? else {
            return Ok(None);
        };
        let members = group_member::Entity::find()
            .filter(group_member::Column::GroupName.eq(name))
            .order_by_asc(group_member::Column::Member)
            .all(db)
            .await?
            .iter()
            .map(|m| parse_subject(&m.member))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Group { name: row.name, description: row.description, members }))
    }

    async fn create_group_now(&self, db: &DatabaseTransaction, name: &str, description: &str) -> Result<Group> {
        let row = group::ActiveModel {
            name: Set(name.to_string()),
            description: Set(description.to_string()),
            created_at: Set(Utc::now()),
        };
        let inserted = group::Entity::insert(row)
            .on_conflict(OnConflict::column(group::Column::Name).do_nothing().to_owned())
            .exec_without_returning(db)
            .await?;
        if inserted == 0 {
            return Err(Error::AlreadyExists(format!("group:{name} exists already")));
        }
        Ok(Group { name: name.to_string(), description: description.to_string(), members: Vec::new() })
    }

    async fn delete_group_now(&self, db: &DatabaseTransaction, name: &str) -> Result<()> {
        let subject = Principal::group(name).to_string();
        let owned: Vec<String> = bundle::Entity::find()
            .filter(bundle::Column::Owner.eq(&subject))
            .all(db)
            .await?
            .into_iter()
            .map(|b| b.name)
            .collect();
        if !owned.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "{subject} owns bundle(s) {}; give them another owner with UpdateBundle first",
                owned.join(", ")
            )));
        }
        let removed = group::Entity::delete_by_id(name.to_string()).exec(db).await?;
        if removed.rows_affected == 0 {
            return Err(Error::NotFound(format!("{subject} does not exist")));
        }
        group_member::Entity::delete_many().filter(group_member::Column::Member.eq(&subject)).exec(db).await?;
        bundle_grant::Entity::delete_many().filter(bundle_grant::Column::Subject.eq(&subject)).exec(db).await?;
        domain_member::Entity::delete_many().filter(domain_member::Column::Subject.eq(&subject)).exec(db).await?;
        Ok(())
    }

    async fn add_group_member_now(&self, db: &DatabaseTransaction, name: &str, member: &Principal) -> Result<Group> {
        if db.get_database_backend() == DbBackend::Postgres {
            db.execute_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_advisory_xact_lock({GROUP_EDGES_LOCK_ID})"),
            ))
            .await?;
        }
        if group::Entity::find_by_id(name.to_string()).one(db).await?.is_none() {
            return Err(Error::NotFound(format!("group:{name} does not exist; create it with CreateGroup")));
        }
        if member.is_group() {
            let mut edges: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
            for e in
                group_member::Entity::find().filter(group_member::Column::Member.starts_with("group:")).all(db).await?
            {
                if let Some(child) = e.member.strip_prefix("group:") {
                    edges.entry(child.to_string()).or_default().insert(e.group_name);
                }
            }
            if let Some(path) = rules::cycle(&edges, name, &member.name) {
                return Err(Error::FailedPrecondition(format!(
                    "adding {member} to group:{name} would form a cycle: {path}"
                )));
            }
        }
        let row = group_member::ActiveModel {
            group_name: Set(name.to_string()),
            member: Set(member.to_string()),
            created_at: Set(Utc::now()),
        };
        group_member::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([group_member::Column::GroupName, group_member::Column::Member])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
        let group = self.load_group(db, name).await?.ok_or_else(|| Error::Internal("group vanished".into()))?;
        Ok(group)
    }

    async fn remove_group_member_now(&self, db: &DatabaseTransaction, name: &str, member: &Principal) -> Result<Group> {
        let removed = group_member::Entity::delete_by_id((name.to_string(), member.to_string())).exec(db).await?;
        if removed.rows_affected == 0 {
            return Err(Error::NotFound(format!("{member} is not a member of group:{name}")));
        }
        self.load_group(db, name).await?.ok_or_else(|| Error::NotFound(format!("group:{name} does not exist")))
    }

    pub async fn groups(&self) -> Result<Vec<Group>> {
        self.bounded(async {
            let rows = group::Entity::find().order_by_asc(group::Column::Name).all(&self.db).await?;
            let members = group_member::Entity::find().order_by_asc(group_member::Column::Member).all(&self.db).await?;
            rows.into_iter()
                .map(|g| {
                    let members = members
                        .iter()
                        .filter(|m| m.group_name == g.name)
                        .map(|m| parse_subject(&m.member))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(Group { name: g.name, description: g.description, members })
                })
                .collect()
        })
        .await
    }

    // Bundles.

    async fn load_bundle(&self, db: &impl ConnectionTrait, name: &str) -> Result<Option<Bundle>> {
        let Some(row) = bundle::Entity::find_by_id(name.to_string()).one(db).await? else {
            return Ok(None);
        };
        let grants = bundle_grant::Entity::find()
            .filter(bundle_grant::Column::Bundle.eq(name))
            .order_by_asc(bundle_grant::Column::Subject)
            .all(db)
            .await?
            .into_iter()
            .filter_map(|g| Some((g.subject, Permission::from_bundle_grant_name(&g.permission)?)))
            .map(|(s, p)| Ok((parse_subject(&s)?, p)))
            .collect::<Result<Vec<_>>>()?;
        let resources = bundle_resource::Entity::find()
            .filter(bundle_resource::Column::Bundle.eq(name))
            .order_by_asc(bundle_resource::Column::ResourceId)
            .all(db)
            .await?
            .into_iter()
            .filter_map(|r| Some((ResourceType::from_name(&r.resource_type)?, r.resource_id)))
            .collect();
        Ok(Some(Bundle {
            name: row.name,
            description: row.description,
            owner: parse_subject(&row.owner)?,
            grants,
            resources,
        }))
    }

    pub async fn bundle(&self, name: &str) -> Result<Bundle> {
        self.bounded(async {
            self.load_bundle(&self.db, name)
                .await?
                .ok_or_else(|| Error::NotFound(format!("bundle {name} does not exist")))
        })
        .await
    }

    pub async fn bundle_names(&self) -> Result<Vec<String>> {
        self.bounded(async {
            Ok(bundle::Entity::find()
                .order_by_asc(bundle::Column::Name)
                .all(&self.db)
                .await?
                .into_iter()
                .map(|b| b.name)
                .collect())
        })
        .await
    }

    async fn create_bundle_now(
        &self,
        db: &DatabaseTransaction,
        name: &str,
        description: &str,
        owner: &Principal,
    ) -> Result<Bundle> {
        let row = bundle::ActiveModel {
            name: Set(name.to_string()),
            description: Set(description.to_string()),
            owner: Set(owner.to_string()),
            created_at: Set(Utc::now()),
        };
        let inserted = bundle::Entity::insert(row)
            .on_conflict(OnConflict::column(bundle::Column::Name).do_nothing().to_owned())
            .exec_without_returning(db)
            .await?;
        if inserted == 0 {
            return Err(Error::AlreadyExists(format!("bundle {name} exists already")));
        }
        Ok(Bundle {
            name: name.to_string(),
            description: description.to_string(),
            owner: owner.clone(),
            grants: Vec::new(),
            resources: Vec::new(),
        })
    }

    async fn update_bundle_now(&self, db: &DatabaseTransaction, name: &str, change: BundleChange) -> Result<Bundle> {
        let Some(row) = bundle::Entity::find_by_id(name.to_string()).one(db).await? else {
            return Err(Error::NotFound(format!("bundle {name} does not exist")));
        };
        let mut active: bundle::ActiveModel = row.into();
        if let Some(d) = change.description {
            active.description = Set(d);
        }
        if let Some(o) = change.owner {
            active.owner = Set(o.to_string());
        }
        bundle::Entity::update(active).exec(db).await?;
        self.load_bundle(db, name).await?.ok_or_else(|| Error::NotFound(format!("bundle {name} does not exist")))
    }

    async fn delete_bundle_now(&self, db: &DatabaseTransaction, name: &str) -> Result<()> {
        let held: Vec<String> = bundle_resource::Entity::find()
            .filter(bundle_resource::Column::Bundle.eq(name))
            .order_by_asc(bundle_resource::Column::ResourceId)
            .all(db)
            .await?
            .into_iter()
            .map(|r| format!("{} {}", r.resource_type, r.resource_id))
            .collect();
        if !held.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "bundle {name} still holds {}; delete those resources first",
                held.join(", ")
            )));
        }
        let removed = bundle::Entity::delete_by_id(name.to_string()).exec(db).await?;
        if removed.rows_affected == 0 {
            return Err(Error::NotFound(format!("bundle {name} does not exist")));
        }
        Ok(())
    }

    async fn grant_bundle_now(
        &self,
        db: &DatabaseTransaction,
        name: &str,
        subject: &Principal,
        permission: Permission,
    ) -> Result<Bundle> {
        if bundle::Entity::find_by_id(name.to_string()).one(db).await?.is_none() {
            return Err(Error::NotFound(format!("bundle {name} does not exist")));
        }
        let row = bundle_grant::ActiveModel {
            bundle: Set(name.to_string()),
            subject: Set(subject.to_string()),
            permission: Set(permission.name().to_string()),
            created_at: Set(Utc::now()),
        };
        bundle_grant::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([
                    bundle_grant::Column::Bundle,
                    bundle_grant::Column::Subject,
                    bundle_grant::Column::Permission,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
        self.load_bundle(db, name).await?.ok_or_else(|| Error::NotFound(format!("bundle {name} does not exist")))
    }

    async fn revoke_bundle_now(
        &self,
        db: &DatabaseTransaction,
        name: &str,
        subject: &Principal,
        permission: Permission,
    ) -> Result<Bundle> {
        let removed =
            bundle_grant::Entity::delete_by_id((name.to_string(), subject.to_string(), permission.name().to_string()))
                .exec(db)
                .await?;
        if removed.rows_affected == 0 {
            return Err(Error::NotFound(format!("{subject} holds no {} grant on bundle {name}", permission.name())));
        }
        self.load_bundle(db, name).await?.ok_or_else(|| Error::NotFound(format!("bundle {name} does not exist")))
    }

    // Resources.

    async fn register_resource_now(
        &self,
        db: &DatabaseTransaction,
        kind: ResourceType,
        id: &str,
        bundle: &str,
        domain: &str,
    ) -> Result<()> {
        if bundle::Entity::find_by_id(bundle.to_string()).one(db).await?.is_none() {
            return Err(Error::NotFound(format!("bundle {bundle} does not exist")));
        }
        // One statement decides, however many registrations race (no
        // read-then-write transaction for SQLite to refuse as busy).
        let row = bundle_resource::ActiveModel {
            resource_type: Set(kind.name().to_string()),
            resource_id: Set(id.to_string()),
            bundle: Set(bundle.to_string()),
            domain: Set(domain.to_string()),
            created_at: Set(Utc::now()),
        };
        let inserted = bundle_resource::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([bundle_resource::Column::ResourceType, bundle_resource::Column::ResourceId])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await;
        match inserted {
            Err(e) if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_))) => {
                return Err(Error::NotFound(format!("bundle {bundle} does not exist")));
            }
            other => other?,
        };
        let existing = bundle_resource::Entity::find_by_id((kind.name().to_string(), id.to_string()))
            .one(db)
            .await?
            .ok_or_else(|| Error::Internal("a registered resource vanished".into()))?;
        if existing.bundle != bundle {
            return Err(Error::FailedPrecondition(format!(
                "{} {id} belongs to bundle {}; a resource's bundle is fixed when it is created and never changes: create a new one in bundle {bundle}",
                kind.name(),
                existing.bundle
            )));
        }
        Ok(())
    }

    async fn unregister_resource_now(&self, db: &DatabaseTransaction, kind: ResourceType, id: &str) -> Result<()> {
        let removed = bundle_resource::Entity::delete_by_id((kind.name().to_string(), id.to_string())).exec(db).await?;
        if removed.rows_affected == 0 {
            return Err(Error::NotFound(format!("{} {id} is in no bundle", kind.name())));
        }
        Ok(())
    }
}

/// Every change to the grants: written by the [`Writer`] with the changes
/// queued beside it, then published to the decision leases (also when it
/// failed: part of it may have been written).
impl Policy {
    /// Writes `change` and publishes it. Concurrent changes share one
    /// transaction and, through [`secrets_common::leases::Leases::publish`], one
    /// round of the decision leases. Both run in a task of their own: a
    /// caller that goes away cannot keep a queued change from being
    /// published once it is written, however long it waited in the queue.
    async fn change<T: Send + 'static>(
        &self,
        change: impl for<'a> FnOnce(&'a Policy, &'a DatabaseTransaction) -> BoxFuture<'a, Result<T>> + Send + 'static,
    ) -> Result<T> {
        let policy = self.clone();
        let publication = self.publication();
        let written = tokio::spawn(
            async move {
                let writer = policy.writer.clone();
                let replicas = policy.replicas.clone();
                let known = policy.known.clone();
                let result = writer.write(Box::new(move |db| Box::pin(async move { change(&policy, db).await }))).await;
                let Some(replicas) = replicas else {
                    publication.publish(result.is_err()).await;
                    return result;
                };
                // The version this change made (a failed one may still have
                // landed: then the newest the database tells).
                let version = match result {
                    Ok(_) => Some(writer.committed()),
                    Err(_) => replicas.version().await.ok(),
                };
                if let Some(version) = version {
                    known.fetch_max(version, std::sync::atomic::Ordering::SeqCst);
                }
                publication.publish(result.is_err()).await;
                let Some(version) = version else { return result };
                match (replicas.wait_for_others(version).await, result) {
                    (Err(e), Ok(_)) => Err(e),
                    (_, result) => result,
                }
            }
            .in_current_span(),
        );
        written.await.map_err(|e| Error::Internal(format!("a grant change's task ended early: {e}")))?
    }

    /// Adds a member or changes its role; idempotent.
    pub async fn add_member(&self, domain: &str, subject: &Principal, role: Role) -> Result<Member> {
        let (domain, subject) = (domain.to_string(), subject.clone());
        self.change(move |policy, db| Box::pin(async move { policy.add_member_now(db, &domain, &subject, role).await }))
            .await
    }

    /// Removes a member; its permissions in the domain go with it (the
    /// database cascades the delete).
    pub async fn remove_member(&self, domain: &str, subject: &Principal) -> Result<()> {
        let (domain, subject) = (domain.to_string(), subject.clone());
        self.change(move |policy, db| Box::pin(async move { policy.remove_member_now(db, &domain, &subject).await }))
            .await
    }

    /// Grants a permission to a member, in one transaction. The foreign key
    /// to the member row means a member removed at the same moment cannot
    /// leave the permission behind.
    pub async fn grant(&self, domain: &str, subject: &Principal, permission: Permission) -> Result<Member> {
        let (domain, subject) = (domain.to_string(), subject.clone());
        self.change(move |policy, db| {
            Box::pin(async move { policy.grant_now(db, &domain, &subject, permission).await })
        })
        .await
    }

    pub async fn revoke(&self, domain: &str, subject: &Principal, permission: Permission) -> Result<Member> {
        let (domain, subject) = (domain.to_string(), subject.clone());
        self.change(move |policy, db| {
            Box::pin(async move { policy.revoke_now(db, &domain, &subject, permission).await })
        })
        .await
    }

    pub async fn grant_admin(&self, subject: &Principal) -> Result<()> {
        let subject = subject.clone();
        self.change(move |policy, db| Box::pin(async move { policy.grant_admin_now(db, &subject).await })).await
    }

    pub async fn revoke_admin(&self, subject: &Principal) -> Result<()> {
        let subject = subject.clone();
        self.change(move |policy, db| Box::pin(async move { policy.revoke_admin_now(db, &subject).await })).await
    }

    pub async fn create_group(&self, name: &str, description: &str) -> Result<Group> {
        let (name, description) = (name.to_string(), description.to_string());
        self.change(move |policy, db| Box::pin(async move { policy.create_group_now(db, &name, &description).await }))
            .await
    }

    /// Deletes a group, its memberships (as a group and as a member of other
    /// groups) and every grant and domain role it held. A group that owns a
    /// bundle is kept: give the bundle another owner first.
    pub async fn delete_group(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.change(move |policy, db| Box::pin(async move { policy.delete_group_now(db, &name).await })).await
    }

    /// Adds a member to a group; a group member that would close a cycle is
    /// refused, naming it.
    pub async fn add_group_member(&self, name: &str, member: &Principal) -> Result<Group> {
        let (name, member) = (name.to_string(), member.clone());
        self.change(move |policy, db| Box::pin(async move { policy.add_group_member_now(db, &name, &member).await }))
            .await
    }

    pub async fn remove_group_member(&self, name: &str, member: &Principal) -> Result<Group> {
        let (name, member) = (name.to_string(), member.clone());
        self.change(move |policy, db| Box::pin(async move { policy.remove_group_member_now(db, &name, &member).await }))
            .await
    }

    pub async fn create_bundle(&self, name: &str, description: &str, owner: &Principal) -> Result<Bundle> {
        let (name, description, owner) = (name.to_string(), description.to_string(), owner.clone());
        self.change(move |policy, db| {
            Box::pin(async move { policy.create_bundle_now(db, &name, &description, &owner).await })
        })
        .await
    }

    pub async fn update_bundle(&self, name: &str, change: BundleChange) -> Result<Bundle> {
        let name = name.to_string();
        self.change(move |policy, db| Box::pin(async move { policy.update_bundle_now(db, &name, change).await })).await
    }

    /// Deletes a bundle and its grants; a bundle that still holds resources
    /// is kept, and the refusal names them.
    pub async fn delete_bundle(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.change(move |policy, db| Box::pin(async move { policy.delete_bundle_now(db, &name).await })).await
    }

    pub async fn grant_bundle(&self, name: &str, subject: &Principal, permission: Permission) -> Result<Bundle> {
        let (name, subject) = (name.to_string(), subject.clone());
        self.change(move |policy, db| {
            Box::pin(async move { policy.grant_bundle_now(db, &name, &subject, permission).await })
        })
        .await
    }

    pub async fn revoke_bundle(&self, name: &str, subject: &Principal, permission: Permission) -> Result<Bundle> {
        let (name, subject) = (name.to_string(), subject.clone());
        self.change(move |policy, db| {
            Box::pin(async move { policy.revoke_bundle_now(db, &name, &subject, permission).await })
        })
        .await
    }

    /// Records that a resource belongs to a bundle. Registering it again in
    /// the same bundle is harmless; in another bundle it is refused:
    /// resources never move.
    pub async fn register_resource(&self, kind: ResourceType, id: &str, bundle: &str, domain: &str) -> Result<()> {
        let (id, bundle, domain) = (id.to_string(), bundle.to_string(), domain.to_string());
        self.change(move |policy, db| {
            Box::pin(async move { policy.register_resource_now(db, kind, &id, &bundle, &domain).await })
        })
        .await
    }

    pub async fn unregister_resource(&self, kind: ResourceType, id: &str) -> Result<()> {
        let id = id.to_string();
        self.change(move |policy, db| Box::pin(async move { policy.unregister_resource_now(db, kind, &id).await }))
            .await
    }
}
