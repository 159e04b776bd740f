//! The grants in the database, and the queries behind every decision. The
//! rules themselves are in [`crate::rules`].
//!
//! A batch of checks costs one query, however many checks it holds. Every
//! database call is bounded by the configured timeout, so a database that
//! stops answering turns into `UNAVAILABLE` naming the database at once.

use std::{collections::BTreeSet, future::Future, time::Duration};

use chrono::Utc;
use sea_orm::{
    ColumnTrait, ConnAcquireErr, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter,
    QueryOrder, Set, SqlErr, TransactionTrait,
    sea_query::{Alias, Expr, OnConflict, Query, SelectStatement, UnionType},
};
use secrets_common::Principal;

pub use crate::rules::{Check, Decision, Permission, Role};
use crate::{
    Error, Result,
    db::{domain_member, domain_permission, platform_admin},
    rules::{self, Facts},
};

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
}

fn parse_subject(text: &str) -> Result<Principal> {
    Principal::parse("subject", text).map_err(|e| Error::Internal(format!("a stored subject is invalid: {e}")))
}

fn parse_role(text: &str) -> Result<Role> {
    Role::parse(text).ok_or_else(|| {
        Error::Internal(format!("a stored domain role is {text:?}; only \"owner\" and \"member\" are understood"))
    })
}

impl Policy {
    pub fn new(db: DatabaseConnection, bootstrap_admins: BTreeSet<Principal>, timeout: Duration) -> Self {
        Self { db, bootstrap_admins, timeout }
    }

    fn backend(&self) -> &'static str {
        match self.db.get_database_backend() {
            DbBackend::Postgres => "postgres",
            DbBackend::Sqlite => "sqlite",
            _ => "database",
        }
    }

    /// Runs one database operation within the timeout; database failures
    /// become [`Error::Database`] naming the database.
    async fn bounded<T>(&self, operation: impl Future<Output = Result<T>>) -> Result<T> {
        let backend = self.backend();
        let too_slow = || format!("did not answer within {} ms", self.timeout.as_millis());
        match tokio::time::timeout(self.timeout, operation).await {
            Err(_) => Err(Error::Database { backend, message: too_slow() }),
            Ok(Err(Error::Db(e))) => {
                tracing::error!(backend, error = %e, "database call failed");
                let message = match &e {
                    // Every pooled connection is stuck on a database that
                    // does not answer: the same failure as a slow statement.
                    DbErr::ConnectionAcquire(ConnAcquireErr::Timeout) => too_slow(),
                    DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => "cannot connect".to_string(),
                    _ => "a query failed".to_string(),
                };
                Err(Error::Database { backend, message })
            }
            Ok(other) => other,
        }
    }

    /// Everything the database holds about `subjects` (their admin rows) and
    /// about `subjects` in `domains` (roles, grants): one query.
    async fn facts(&self, subjects: &BTreeSet<Principal>, domains: &BTreeSet<String>) -> Result<Facts> {
        let names: Vec<String> = subjects.iter().map(ToString::to_string).collect();
        let domains: Vec<String> = domains.iter().cloned().collect();
        let part = |kind: &str, subject: Expr, domain: Expr, value: Expr| {
            Query::select()
                .expr_as(Expr::val(kind), Alias::new("kind"))
                .expr_as(subject, Alias::new("subject"))
                .expr_as(domain, Alias::new("domain"))
                .expr_as(value, Alias::new("value"))
                .to_owned()
        };
        let mut query: SelectStatement =
            part("admin", Expr::col(platform_admin::Column::Subject), Expr::val(""), Expr::val(""))
                .from(platform_admin::Entity)
                .and_where(platform_admin::Column::Subject.is_in(names.clone()))
                .to_owned();
        if !domains.is_empty() {
            let members = part(
                "role",
                Expr::col(domain_member::Column::Subject),
                Expr::col(domain_member::Column::Domain),
                Expr::col(domain_member::Column::Role),
            )
            .from(domain_member::Entity)
            .and_where(domain_member::Column::Subject.is_in(names.clone()))
            .and_where(domain_member::Column::Domain.is_in(domains.clone()))
            .to_owned();
            let grants = part(
                "grant",
                Expr::col(domain_permission::Column::Subject),
                Expr::col(domain_permission::Column::Domain),
                Expr::col(domain_permission::Column::Permission),
            )
            .from(domain_permission::Entity)
            .and_where(domain_permission::Column::Subject.is_in(names))
            .and_where(domain_permission::Column::Domain.is_in(domains))
            .to_owned();
            query.union(UnionType::All, members).union(UnionType::All, grants);
        }
        let rows = self.db.query_all(&query).await?;
        let mut facts = Facts { admins: self.bootstrap_admins.clone(), ..Facts::default() };
        for row in rows {
            let kind: String = row.try_get("", "kind")?;
            let subject = parse_subject(&row.try_get::<String>("", "subject")?)?;
            let domain: String = row.try_get("", "domain")?;
            let value: String = row.try_get("", "value")?;
            match kind.as_str() {
                "admin" => {
                    facts.admins.insert(subject);
                }
                "role" => {
                    facts.roles.insert((domain, subject), parse_role(&value)?);
                }
                _ => {
                    if let Some(p) = Permission::from_grant_name(&value) {
                        facts.grants.insert((domain, subject, p));
                    }
                }
            }
        }
        Ok(facts)
    }

    /// Answers every check, and whether `caller` (if given) is a platform
    /// admin, from one database query.
    pub async fn check_batch(&self, caller: Option<&Principal>, checks: &[Check]) -> Result<(bool, Vec<Decision>)> {
        let mut subjects: BTreeSet<Principal> = checks.iter().map(|c| c.subject.clone()).collect();
        subjects.extend(caller.cloned());
        let domains: BTreeSet<String> = checks.iter().filter_map(|c| c.domain.clone()).collect();
        let facts = self.bounded(self.facts(&subjects, &domains)).await?;
        let caller_is_admin = caller.is_some_and(|c| facts.is_admin(c));
        Ok((caller_is_admin, checks.iter().map(|c| rules::decide(&facts, c)).collect()))
    }

    pub async fn check(&self, subject: &Principal, permission: Permission, domain: Option<&str>) -> Result<Decision> {
        let check = Check { subject: subject.clone(), permission, domain: domain.map(str::to_string) };
        let (_, mut decisions) = self.check_batch(None, std::slice::from_ref(&check)).await?;
        decisions.pop().ok_or_else(|| Error::Internal("a check went unanswered".into()))
    }

    pub async fn is_platform_admin(&self, subject: &Principal) -> Result<bool> {
        Ok(self.check_batch(Some(subject), &[]).await?.0)
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

    /// Adds a member or changes its role; idempotent.
    pub async fn add_member(&self, domain: &str, subject: &Principal, role: Role) -> Result<Member> {
        self.bounded(async {
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
                .exec_without_returning(&self.db)
                .await?;
            self.load_member(&self.db, domain, subject)
                .await?
                .ok_or_else(|| Error::Internal("member vanished after insert".into()))
        })
        .await
    }

    /// Removes a member; its permissions in the domain go with it (the
    /// database cascades the delete).
    pub async fn remove_member(&self, domain: &str, subject: &Principal) -> Result<()> {
        self.bounded(async {
            let removed =
                domain_member::Entity::delete_by_id((domain.to_string(), subject.to_string())).exec(&self.db).await?;
            if removed.rows_affected == 0 {
                return Err(Error::NotFound(format!("{subject} is not a member of domain {domain:?}")));
            }
            Ok(())
        })
        .await
    }

    /// Grants a permission to a member, in one transaction. The foreign key
    /// to the member row means a member removed at the same moment cannot
    /// leave the permission behind.
    pub async fn grant(&self, domain: &str, subject: &Principal, permission: Permission) -> Result<Member> {
        let not_member = || {
            Error::FailedPrecondition(format!(
                "{subject} is not a member of domain {domain:?}; add it with AddDomainMember first"
            ))
        };
        self.bounded(async {
            let txn = self.db.begin().await?;
            if self.load_member(&txn, domain, subject).await?.is_none() {
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
                .exec_without_returning(&txn)
                .await;
            match inserted {
                Err(e) if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_))) => {
                    return Err(not_member());
                }
                other => other?,
            };
            let member = self.load_member(&txn, domain, subject).await?.ok_or_else(not_member)?;
            txn.commit().await?;
            Ok(member)
        })
        .await
    }

    pub async fn revoke(&self, domain: &str, subject: &Principal, permission: Permission) -> Result<Member> {
        self.bounded(async {
            let txn = self.db.begin().await?;
            if self.load_member(&txn, domain, subject).await?.is_none() {
                return Err(Error::NotFound(format!("{subject} is not a member of domain {domain:?}")));
            }
            domain_permission::Entity::delete_by_id((
                domain.to_string(),
                subject.to_string(),
                permission.name().to_string(),
            ))
            .exec(&txn)
            .await?;
            let member = self
                .load_member(&txn, domain, subject)
                .await?
                .ok_or_else(|| Error::Internal("member vanished during revoke".into()))?;
            txn.commit().await?;
            Ok(member)
        })
        .await
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

    pub async fn grant_admin(&self, subject: &Principal) -> Result<()> {
        self.bounded(async {
            let row = platform_admin::ActiveModel { subject: Set(subject.to_string()), created_at: Set(Utc::now()) };
            platform_admin::Entity::insert(row)
                .on_conflict(OnConflict::column(platform_admin::Column::Subject).do_nothing().to_owned())
                .exec_without_returning(&self.db)
                .await?;
            Ok(())
        })
        .await
    }

    pub async fn revoke_admin(&self, subject: &Principal) -> Result<()> {
        if self.bootstrap_admins.contains(subject) {
            return Err(Error::FailedPrecondition(format!(
                "{subject} is a platform admin by configuration (bootstrap_admins); remove it there"
            )));
        }
        self.bounded(async {
            let removed = platform_admin::Entity::delete_by_id(subject.to_string()).exec(&self.db).await?;
            if removed.rows_affected == 0 {
                return Err(Error::NotFound(format!("{subject} is not a platform admin")));
            }
            Ok(())
        })
        .await
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
}
