//! Who may do what: platform admins everything, domain owners everything in
//! their domain, members what their permissions say. Deny by default.

use std::collections::BTreeSet;

use chrono::Utc;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, Set, TransactionTrait, sea_query::OnConflict,
};
use secrets_common::Principal;

use crate::{
    Error, Result,
    db::{domain_member, domain_permission, platform_admin},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    ListSecrets,
    ManageSecrets,
    UseSecrets,
    ManageDomainAccess,
    PlatformAdmin,
}

impl Permission {
    pub fn name(self) -> &'static str {
        match self {
            Self::ListSecrets => "LIST_SECRETS",
            Self::ManageSecrets => "MANAGE_SECRETS",
            Self::UseSecrets => "USE_SECRETS",
            Self::ManageDomainAccess => "MANAGE_DOMAIN_ACCESS",
            Self::PlatformAdmin => "PLATFORM_ADMIN",
        }
    }

    /// The permissions a member can be granted; the rest come from roles.
    pub fn is_grantable(self) -> bool {
        matches!(self, Self::ListSecrets | Self::ManageSecrets)
    }

    fn from_name(name: &str) -> Option<Self> {
        [Self::ListSecrets, Self::ManageSecrets].into_iter().find(|p| p.name() == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Owner,
    Member,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Member => "member",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "owner" { Self::Owner } else { Self::Member }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

impl Decision {
    fn allow(reason: impl Into<String>) -> Self {
        Self { allowed: true, reason: reason.into() }
    }

    fn deny(reason: impl Into<String>) -> Self {
        Self { allowed: false, reason: reason.into() }
    }
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
}

impl Policy {
    pub fn new(db: DatabaseConnection, bootstrap_admins: BTreeSet<Principal>) -> Self {
        Self { db, bootstrap_admins }
    }

    pub async fn is_platform_admin(&self, subject: &Principal) -> Result<bool> {
        if self.bootstrap_admins.contains(subject) {
            return Ok(true);
        }
        Ok(platform_admin::Entity::find_by_id(subject.to_string()).one(&self.db).await?.is_some())
    }

    pub async fn check(&self, subject: &Principal, permission: Permission, domain: Option<&str>) -> Result<Decision> {
        if self.is_platform_admin(subject).await? {
            return Ok(Decision::allow(format!("{subject} is a platform admin")));
        }
        let Some(domain) = domain else {
            return Ok(Decision::deny(format!(
                "{} needs a platform admin and {subject} is not one",
                permission.name()
            )));
        };
        if permission == Permission::PlatformAdmin {
            return Ok(Decision::deny(format!("{subject} is not a platform admin")));
        }
        let Some(member) = self.member(domain, subject).await? else {
            return Ok(Decision::deny(format!("{subject} is not a member of domain {domain:?}")));
        };
        Ok(match (member.role, permission) {
            (Role::Owner, _) => Decision::allow(format!("{subject} owns domain {domain:?}")),
            (Role::Member, Permission::UseSecrets) => {
                Decision::allow(format!("{subject} is a member of domain {domain:?}"))
            }
            (Role::Member, p) if member.permissions.contains(&p) => {
                Decision::allow(format!("{subject} holds {} in domain {domain:?}", p.name()))
            }
            (Role::Member, Permission::ManageDomainAccess) => {
                Decision::deny(format!("{subject} is a member, not an owner, of domain {domain:?}"))
            }
            (Role::Member, p) => Decision::deny(format!("{subject} does not hold {} in domain {domain:?}", p.name())),
        })
    }

    pub async fn member(&self, domain: &str, subject: &Principal) -> Result<Option<Member>> {
        let Some(row) =
            domain_member::Entity::find_by_id((domain.to_string(), subject.to_string())).one(&self.db).await?
        else {
            return Ok(None);
        };
        let permissions = domain_permission::Entity::find()
            .filter(domain_permission::Column::Domain.eq(domain))
            .filter(domain_permission::Column::Subject.eq(subject.to_string()))
            .all(&self.db)
            .await?
            .into_iter()
            .filter_map(|p| Permission::from_name(&p.permission))
            .collect();
        Ok(Some(Member { domain: row.domain, subject: subject.clone(), role: Role::parse(&row.role), permissions }))
    }

    /// Adds a member or changes its role; idempotent.
    pub async fn add_member(&self, domain: &str, subject: &Principal, role: Role) -> Result<Member> {
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
        self.member(domain, subject).await?.ok_or_else(|| Error::Internal("member vanished after insert".into()))
    }

    /// Removes a member and every permission it held in the domain.
    pub async fn remove_member(&self, domain: &str, subject: &Principal) -> Result<()> {
        let txn = self.db.begin().await?;
        domain_permission::Entity::delete_many()
            .filter(domain_permission::Column::Domain.eq(domain))
            .filter(domain_permission::Column::Subject.eq(subject.to_string()))
            .exec(&txn)
            .await?;
        let removed = domain_member::Entity::delete_by_id((domain.to_string(), subject.to_string())).exec(&txn).await?;
        if removed.rows_affected == 0 {
            return Err(Error::NotFound(format!("{subject} is not a member of domain {domain:?}")));
        }
        txn.commit().await?;
        Ok(())
    }

    pub async fn grant(&self, domain: &str, subject: &Principal, permission: Permission) -> Result<Member> {
        if self.member(domain, subject).await?.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "{subject} is not a member of domain {domain:?}; add it with AddDomainMember first"
            )));
        }
        let row = domain_permission::ActiveModel {
            domain: Set(domain.to_string()),
            subject: Set(subject.to_string()),
            permission: Set(permission.name().to_string()),
            created_at: Set(Utc::now()),
        };
        domain_permission::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([
                    domain_permission::Column::Domain,
                    domain_permission::Column::Subject,
                    domain_permission::Column::Permission,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
        self.member(domain, subject).await?.ok_or_else(|| Error::Internal("member vanished after grant".into()))
    }

    pub async fn revoke(&self, domain: &str, subject: &Principal, permission: Permission) -> Result<Member> {
        let Some(_) = self.member(domain, subject).await? else {
            return Err(Error::NotFound(format!("{subject} is not a member of domain {domain:?}")));
        };
        domain_permission::Entity::delete_by_id((
            domain.to_string(),
            subject.to_string(),
            permission.name().to_string(),
        ))
        .exec(&self.db)
        .await?;
        self.member(domain, subject).await?.ok_or_else(|| Error::Internal("member vanished after revoke".into()))
    }

    pub async fn members(&self, domain: &str) -> Result<Vec<Member>> {
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
                let subject = Principal::parse("subject", &row.subject)
                    .map_err(|e| Error::Internal(format!("stored subject is invalid: {e}")))?;
                let permissions = perms
                    .iter()
                    .filter(|p| p.subject == row.subject)
                    .filter_map(|p| Permission::from_name(&p.permission))
                    .collect();
                Ok(Member { domain: row.domain, subject, role: Role::parse(&row.role), permissions })
            })
            .collect()
    }

    pub async fn grant_admin(&self, subject: &Principal) -> Result<()> {
        let row = platform_admin::ActiveModel { subject: Set(subject.to_string()), created_at: Set(Utc::now()) };
        platform_admin::Entity::insert(row)
            .on_conflict(OnConflict::column(platform_admin::Column::Subject).do_nothing().to_owned())
            .exec_without_returning(&self.db)
            .await?;
        Ok(())
    }

    pub async fn revoke_admin(&self, subject: &Principal) -> Result<()> {
        if self.bootstrap_admins.contains(subject) {
            return Err(Error::FailedPrecondition(format!(
                "{subject} is a platform admin by configuration (bootstrap_admins); remove it there"
            )));
        }
        let removed = platform_admin::Entity::delete_by_id(subject.to_string()).exec(&self.db).await?;
        if removed.rows_affected == 0 {
            return Err(Error::NotFound(format!("{subject} is not a platform admin")));
        }
        Ok(())
    }

    /// Every admin: `(subject, from_configuration)`.
    pub async fn admins(&self) -> Result<Vec<(Principal, bool)>> {
        let mut all: Vec<(Principal, bool)> = self.bootstrap_admins.iter().map(|p| (p.clone(), true)).collect();
        for row in platform_admin::Entity::find().order_by_asc(platform_admin::Column::Subject).all(&self.db).await? {
            let p = Principal::parse("subject", &row.subject)
                .map_err(|e| Error::Internal(format!("stored subject is invalid: {e}")))?;
            if !self.bootstrap_admins.contains(&p) {
                all.push((p, false));
            }
        }
        Ok(all)
    }
}
