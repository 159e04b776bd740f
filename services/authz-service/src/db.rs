//! Tables and migrations. The database stores grants (subjects, domains,
//! roles and permission names) and the usage index (which workload field
//! references which key), never a secret value.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection};
use sea_orm_migration::{MigratorTrait, prelude::*};
use secrets_common::observe::Metrics;

pub mod platform_admin {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "platform_admins")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub subject: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod domain_member {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "domain_members")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub domain: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub subject: String,
        /// `owner` or `member`.
        pub role: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod domain_permission {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "domain_permissions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub domain: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub subject: String,
        /// `LIST_SECRETS` or `MANAGE_SECRETS`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub permission: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod group {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "groups")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub description: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod group_member {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "group_members")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub group_name: String,
        /// `user:NAME`, `service:NAME` or `group:NAME`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub member: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod bundle {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "bundles")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub description: String,
        /// `user:NAME` or `group:NAME`.
        pub owner: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod bundle_grant {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "bundle_grants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub bundle: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub subject: String,
        /// `VIEW`, `UPDATE` or `USE`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub permission: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod bundle_resource {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "bundle_resources")]
    pub struct Model {
        /// `VAULT_CONFIG`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub resource_type: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub resource_id: String,
        pub bundle: String,
        pub domain: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod workload {
    use sea_orm::entity::prelude::*;

    /// A saved workload in the usage index.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "workloads")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub domain: String,
        /// `SPARK_JOB`, `COMPUTE`, ...
        #[sea_orm(primary_key, auto_increment = false)]
        pub kind: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub saved_by: String,
        pub saved_at: ChronoDateTimeUtc,
        /// The identity that owns the record (empty: recorded before owners).
        pub owner: String,
        /// The fields that hold a plaintext credential, one per line (the
        /// fields, never the values); empty when none does.
        pub plaintext_fields: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod workload_reference {
    use sea_orm::entity::prelude::*;

    /// One reference of a saved workload: where it points, never a value.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "workload_references")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub domain: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub kind: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub workload_id: String,
        /// The field's path in the payload.
        #[sea_orm(primary_key, auto_increment = false)]
        pub field: String,
        /// `KUBERNETES` or `VAULT`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub source_type: String,
        /// The domain looked in first, or the Vault config id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub source_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub placeholder: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

#[derive(DeriveIden)]
enum PlatformAdmins {
    Table,
    Subject,
    CreatedAt,
}

#[derive(DeriveIden)]
enum DomainMembers {
    Table,
    Domain,
    Subject,
    Role,
    CreatedAt,
}

#[derive(DeriveIden)]
enum DomainPermissions {
    Table,
    Domain,
    Subject,
    Permission,
    CreatedAt,
}

struct CreateGrantTables;

impl MigrationName for CreateGrantTables {
    fn name(&self) -> &str {
        "m20261128_000001_create_grant_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateGrantTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(PlatformAdmins::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(PlatformAdmins::Subject).string_len(270).not_null().primary_key())
                    .col(ColumnDef::new(PlatformAdmins::CreatedAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(DomainMembers::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(DomainMembers::Domain).string_len(63).not_null())
                    .col(ColumnDef::new(DomainMembers::Subject).string_len(270).not_null())
                    .col(ColumnDef::new(DomainMembers::Role).string_len(16).not_null())
                    .col(ColumnDef::new(DomainMembers::CreatedAt).timestamp_with_time_zone().not_null())
                    .primary_key(Index::create().col(DomainMembers::Domain).col(DomainMembers::Subject))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(DomainPermissions::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(DomainPermissions::Domain).string_len(63).not_null())
                    .col(ColumnDef::new(DomainPermissions::Subject).string_len(270).not_null())
                    .col(ColumnDef::new(DomainPermissions::Permission).string_len(32).not_null())
                    .col(ColumnDef::new(DomainPermissions::CreatedAt).timestamp_with_time_zone().not_null())
                    .primary_key(
                        Index::create()
                            .col(DomainPermissions::Domain)
                            .col(DomainPermissions::Subject)
                            .col(DomainPermissions::Permission),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(DomainPermissions::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(DomainMembers::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(PlatformAdmins::Table).to_owned()).await
    }
}

/// Ties each permission to its member row: removing a member removes its
/// permissions in the same statement, and a permission can never be written
/// for a member that is gone (a grant racing a removal fails instead of
/// leaving a permission that would come back when the member is re-added).
/// SQLite cannot add a constraint to a table, so the table is rebuilt;
/// orphaned rows are left behind.
struct PermissionsBelongToMembers;

#[derive(DeriveIden)]
enum DomainPermissionsNew {
    Table,
}

impl MigrationName for PermissionsBelongToMembers {
    fn name(&self) -> &str {
        "m20261129_000002_permissions_belong_to_members"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for PermissionsBelongToMembers {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(DomainPermissionsNew::Table)
                    .col(ColumnDef::new(DomainPermissions::Domain).string_len(63).not_null())
                    .col(ColumnDef::new(DomainPermissions::Subject).string_len(270).not_null())
                    .col(ColumnDef::new(DomainPermissions::Permission).string_len(32).not_null())
                    .col(ColumnDef::new(DomainPermissions::CreatedAt).timestamp_with_time_zone().not_null())
                    .primary_key(
                        Index::create()
                            .col(DomainPermissions::Domain)
                            .col(DomainPermissions::Subject)
                            .col(DomainPermissions::Permission),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_domain_permissions_member")
                            .from_tbl(DomainPermissionsNew::Table)
                            .from_col(DomainPermissions::Domain)
                            .from_col(DomainPermissions::Subject)
                            .to_tbl(DomainMembers::Table)
                            .to_col(DomainMembers::Domain)
                            .to_col(DomainMembers::Subject)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "INSERT INTO domain_permissions_new (domain, subject, permission, created_at) \
                 SELECT p.domain, p.subject, p.permission, p.created_at FROM domain_permissions p \
                 JOIN domain_members m ON m.domain = p.domain AND m.subject = p.subject",
            )
            .await?;
        manager.drop_table(Table::drop().table(DomainPermissions::Table).to_owned()).await?;
        manager
            .rename_table(Table::rename().table(DomainPermissionsNew::Table, DomainPermissions::Table).to_owned())
            .await
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        Err(DbErr::Migration("the member foreign key of domain_permissions is not removed by a down migration".into()))
    }
}

#[derive(DeriveIden)]
enum Groups {
    Table,
    Name,
    Description,
    CreatedAt,
}

#[derive(DeriveIden)]
enum GroupMembers {
    Table,
    GroupName,
    Member,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Bundles {
    Table,
    Name,
    Description,
    Owner,
    CreatedAt,
}

#[derive(DeriveIden)]
enum BundleGrants {
    Table,
    Bundle,
    Subject,
    Permission,
    CreatedAt,
}

#[derive(DeriveIden)]
enum BundleResources {
    Table,
    ResourceType,
    ResourceId,
    Bundle,
    Domain,
    CreatedAt,
}

/// Groups (nested), resource bundles, their grants and the resources they
/// hold. A bundle with resources cannot be deleted (no cascade).
struct GroupsAndBundles;

impl MigrationName for GroupsAndBundles {
    fn name(&self) -> &str {
        "m20261129_000003_groups_and_bundles"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for GroupsAndBundles {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Groups::Table)
                    .col(ColumnDef::new(Groups::Name).string_len(128).not_null().primary_key())
                    .col(ColumnDef::new(Groups::Description).string_len(1024).not_null())
                    .col(ColumnDef::new(Groups::CreatedAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(GroupMembers::Table)
                    .col(ColumnDef::new(GroupMembers::GroupName).string_len(128).not_null())
                    .col(ColumnDef::new(GroupMembers::Member).string_len(270).not_null())
                    .col(ColumnDef::new(GroupMembers::CreatedAt).timestamp_with_time_zone().not_null())
                    .primary_key(Index::create().col(GroupMembers::GroupName).col(GroupMembers::Member))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_group_members_group")
                            .from_tbl(GroupMembers::Table)
                            .from_col(GroupMembers::GroupName)
                            .to_tbl(Groups::Table)
                            .to_col(Groups::Name)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Memberships are followed from the member up.
        manager
            .create_index(
                Index::create()
                    .name("idx_group_members_member")
                    .table(GroupMembers::Table)
                    .col(GroupMembers::Member)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Bundles::Table)
                    .col(ColumnDef::new(Bundles::Name).string_len(128).not_null().primary_key())
                    .col(ColumnDef::new(Bundles::Description).string_len(1024).not_null())
                    .col(ColumnDef::new(Bundles::Owner).string_len(270).not_null())
                    .col(ColumnDef::new(Bundles::CreatedAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(BundleGrants::Table)
                    .col(ColumnDef::new(BundleGrants::Bundle).string_len(128).not_null())
                    .col(ColumnDef::new(BundleGrants::Subject).string_len(270).not_null())
                    .col(ColumnDef::new(BundleGrants::Permission).string_len(16).not_null())
                    .col(ColumnDef::new(BundleGrants::CreatedAt).timestamp_with_time_zone().not_null())
                    .primary_key(
                        Index::create()
                            .col(BundleGrants::Bundle)
                            .col(BundleGrants::Subject)
                            .col(BundleGrants::Permission),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_bundle_grants_bundle")
                            .from_tbl(BundleGrants::Table)
                            .from_col(BundleGrants::Bundle)
                            .to_tbl(Bundles::Table)
                            .to_col(Bundles::Name)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(BundleResources::Table)
                    .col(ColumnDef::new(BundleResources::ResourceType).string_len(32).not_null())
                    .col(ColumnDef::new(BundleResources::ResourceId).string_len(128).not_null())
                    .col(ColumnDef::new(BundleResources::Bundle).string_len(128).not_null())
                    .col(ColumnDef::new(BundleResources::Domain).string_len(63).not_null())
                    .col(ColumnDef::new(BundleResources::CreatedAt).timestamp_with_time_zone().not_null())
                    .primary_key(Index::create().col(BundleResources::ResourceType).col(BundleResources::ResourceId))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_bundle_resources_bundle")
                            .from_tbl(BundleResources::Table)
                            .from_col(BundleResources::Bundle)
                            .to_tbl(Bundles::Table)
                            .to_col(Bundles::Name)
                            .on_delete(ForeignKeyAction::Restrict),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            BundleResources::Table.into_iden(),
            BundleGrants::Table.into_iden(),
            Bundles::Table.into_iden(),
            GroupMembers::Table.into_iden(),
            Groups::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}

pub mod secret_change {
    use sea_orm::entity::prelude::*;

    /// One recorded change to a secret (the change feed): names and
    /// versions, never a value.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "secret_changes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub revision: i64,
        /// Names the change wherever it was seen: a second sighting is
        /// not recorded again.
        #[sea_orm(unique)]
        pub dedupe_key: String,
        /// When it was recorded, Unix milliseconds (retention counts from it).
        pub recorded_at_ms: i64,
        pub source_type: String,
        pub source_id: String,
        pub domain: String,
        pub key: String,
        pub kind: String,
        /// The `SecretChange` message without its revision (protobuf).
        pub body: Vec<u8>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod secret_change_head {
    use sea_orm::entity::prelude::*;

    /// One row: the newest revision given out (every append takes its
    /// revision by bumping it, so revisions commit in order) and the newest
    /// one pruned.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "secret_change_head")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub revision: i64,
        pub pruned_through: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod store_baseline {
    use sea_orm::entity::prelude::*;

    /// A store object as the secret-service last recorded it: its
    /// resourceVersion and key names, never a value. The row with the empty
    /// name marks that baselines were taken.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "store_baselines")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub object: String,
        pub version: i64,
        /// The key names, one per line.
        pub keys: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A counter every change to the grant tables bumps, in the same
/// transaction (database triggers, so no writer can forget it): the
/// in-memory copy of the grants is used only while it is current, which one
/// indexed read tells, on every replica.
pub struct ChangeCounter;

/// The tables whose rows decide permissions.
pub const GRANT_TABLES: [&str; 8] = [
    "platform_admins",
    "domain_members",
    "domain_permissions",
    "groups",
    "group_members",
    "bundles",
    "bundle_grants",
    "bundle_resources",
];

impl MigrationName for ChangeCounter {
    fn name(&self) -> &str {
        "m20261129_000004_change_counter"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ChangeCounter {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = manager.get_database_backend();
        db.execute_unprepared("CREATE TABLE authz_changes (id INTEGER PRIMARY KEY, version BIGINT NOT NULL)").await?;
        db.execute_unprepared("INSERT INTO authz_changes (id, version) VALUES (1, 1)").await?;
        if backend == sea_orm::DbBackend::Postgres {
            db.execute_unprepared(
                "CREATE FUNCTION authz_bump_version() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN UPDATE authz_changes SET version = version + 1 WHERE id = 1; RETURN NULL; END $$",
            )
            .await?;
        }
        for table in GRANT_TABLES {
            match backend {
                sea_orm::DbBackend::Postgres => {
                    db.execute_unprepared(&format!(
                        "CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE ON {table} \
                         FOR EACH STATEMENT EXECUTE FUNCTION authz_bump_version()"
                    ))
                    .await?;
                }
                _ => {
                    for event in ["INSERT", "UPDATE", "DELETE"] {
                        db.execute_unprepared(&format!(
                            "CREATE TRIGGER {table}_{}_changed AFTER {event} ON {table} \
                             BEGIN UPDATE authz_changes SET version = version + 1 WHERE id = 1; END",
                            event.to_ascii_lowercase()
                        ))
                        .await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        Err(DbErr::Migration("the change counter is not removed by a down migration".into()))
    }
}

#[derive(DeriveIden)]
enum Workloads {
    Table,
    Domain,
    Kind,
    Id,
    Name,
    SavedBy,
    SavedAt,
    Owner,
    PlaintextFields,
}

#[derive(DeriveIden)]
enum WorkloadReferences {
    Table,
    Domain,
    Kind,
    WorkloadId,
    Field,
    SourceType,
    SourceId,
    Key,
    Placeholder,
}

/// The usage index: saved workloads and their references (no values), so a
/// delete can tell who still uses a secret.
pub struct UsageIndex;

impl MigrationName for UsageIndex {
    fn name(&self) -> &str {
        "m20261129_000005_usage_index"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for UsageIndex {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Workloads::Table)
                    .col(ColumnDef::new(Workloads::Domain).string_len(63).not_null())
                    .col(ColumnDef::new(Workloads::Kind).string_len(32).not_null())
                    .col(ColumnDef::new(Workloads::Id).string_len(128).not_null())
                    .col(ColumnDef::new(Workloads::Name).string_len(256).not_null())
                    .col(ColumnDef::new(Workloads::SavedBy).string_len(270).not_null())
                    .col(ColumnDef::new(Workloads::SavedAt).timestamp_with_time_zone().not_null())
                    .primary_key(Index::create().col(Workloads::Domain).col(Workloads::Kind).col(Workloads::Id))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(WorkloadReferences::Table)
                    .col(ColumnDef::new(WorkloadReferences::Domain).string_len(63).not_null())
                    .col(ColumnDef::new(WorkloadReferences::Kind).string_len(32).not_null())
                    .col(ColumnDef::new(WorkloadReferences::WorkloadId).string_len(128).not_null())
                    .col(ColumnDef::new(WorkloadReferences::Field).string_len(1024).not_null())
                    .col(ColumnDef::new(WorkloadReferences::SourceType).string_len(16).not_null())
                    .col(ColumnDef::new(WorkloadReferences::SourceId).string_len(64).not_null())
                    .col(ColumnDef::new(WorkloadReferences::Key).string_len(256).not_null())
                    .col(ColumnDef::new(WorkloadReferences::Placeholder).boolean().not_null())
                    .primary_key(
                        Index::create()
                            .col(WorkloadReferences::Domain)
                            .col(WorkloadReferences::Kind)
                            .col(WorkloadReferences::WorkloadId)
                            .col(WorkloadReferences::Field)
                            .col(WorkloadReferences::SourceType)
                            .col(WorkloadReferences::SourceId)
                            .col(WorkloadReferences::Key),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_workload_references_workload")
                            .from_tbl(WorkloadReferences::Table)
                            .from_col(WorkloadReferences::Domain)
                            .from_col(WorkloadReferences::Kind)
                            .from_col(WorkloadReferences::WorkloadId)
                            .to_tbl(Workloads::Table)
                            .to_col(Workloads::Domain)
                            .to_col(Workloads::Kind)
                            .to_col(Workloads::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Who uses this secret: by source and key.
        manager
            .create_index(
                Index::create()
                    .name("idx_workload_references_target")
                    .table(WorkloadReferences::Table)
                    .col(WorkloadReferences::SourceType)
                    .col(WorkloadReferences::Key)
                    .col(WorkloadReferences::SourceId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_workload_references_source")
                    .table(WorkloadReferences::Table)
                    .col(WorkloadReferences::SourceType)
                    .col(WorkloadReferences::SourceId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(WorkloadReferences::Table).to_owned()).await?;
        manager.drop_table(Table::drop().table(Workloads::Table).to_owned()).await
    }
}

/// Which identity saved a workload: only it (or a platform admin) may
/// change or delete its record.
pub struct WorkloadOwner;

impl MigrationName for WorkloadOwner {
    fn name(&self) -> &str {
        "m20261204_000006_workload_owner"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for WorkloadOwner {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Workloads::Table)
                    .add_column(ColumnDef::new(Workloads::Owner).string_len(270).not_null().default(""))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table(Workloads::Table).drop_column(Workloads::Owner).to_owned()).await
    }
}

/// The names authz-service replicas share on PostgreSQL (see
/// [`secrets_db::replicas`]).
pub const REPLICAS: secrets_db::replicas::Names = secrets_db::replicas::Names {
    service: "authz-service",
    counter: "authz_changes",
    table: "authz_replicas",
    channel: "secrets_authz_changes",
    applied_channel: "secrets_authz_applied",
};

/// PostgreSQL: every bump of the change counter is announced to the other
/// replicas (`NOTIFY`, sent at commit), and each replica records what it has
/// applied and its lease in `authz_replicas`.
pub struct Replicas;

impl MigrationName for Replicas {
    fn name(&self) -> &str {
        "m20261207_000001_replicas"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Replicas {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(&format!(
            "CREATE OR REPLACE FUNCTION authz_bump_version() RETURNS trigger LANGUAGE plpgsql AS \
             $$ DECLARE v BIGINT; BEGIN \
             UPDATE authz_changes SET version = version + 1 WHERE id = 1 RETURNING version INTO v; \
             PERFORM pg_notify('{}', v::text); RETURN NULL; END $$",
            REPLICAS.channel
        ))
        .await?;
        db.execute_unprepared(&REPLICAS.create_table()).await?;
        Ok(())
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        Err(DbErr::Migration("the replicas table is not removed by a down migration".into()))
    }
}

/// The change log behind the change feed: each recorded change with its
/// revision, and the head row that hands revisions out in commit order.
/// No trigger: appending a change is no grant change.
pub struct ChangeLog;

impl MigrationName for ChangeLog {
    fn name(&self) -> &str {
        "m20261207_000002_change_log"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ChangeLog {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE secret_change_head (id INTEGER PRIMARY KEY, revision BIGINT NOT NULL, \
             pruned_through BIGINT NOT NULL)",
        )
        .await?;
        db.execute_unprepared("INSERT INTO secret_change_head (id, revision, pruned_through) VALUES (1, 0, 0)").await?;
        let body = match manager.get_database_backend() {
            sea_orm::DbBackend::Postgres => "BYTEA",
            _ => "BLOB",
        };
        db.execute_unprepared(&format!(
            "CREATE TABLE secret_changes (revision BIGINT PRIMARY KEY, dedupe_key VARCHAR(700) NOT NULL UNIQUE, \
             recorded_at_ms BIGINT NOT NULL, source_type VARCHAR(16) NOT NULL, \
             source_id VARCHAR(64) NOT NULL, domain VARCHAR(63) NOT NULL, key VARCHAR(256) NOT NULL, \
             kind VARCHAR(16) NOT NULL, body {body} NOT NULL)"
        ))
        .await?;
        db.execute_unprepared("CREATE INDEX idx_secret_changes_recorded ON secret_changes (recorded_at_ms)").await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP TABLE secret_changes").await?;
        db.execute_unprepared("DROP TABLE secret_change_head").await?;
        Ok(())
    }
}

/// The store objects as last seen, so a secret-service starting after none
/// ran can tell what changed meanwhile.
pub struct StoreBaselines;

impl MigrationName for StoreBaselines {
    fn name(&self) -> &str {
        "m20261207_000003_store_baselines"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for StoreBaselines {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE TABLE store_baselines (object VARCHAR(253) PRIMARY KEY, version BIGINT NOT NULL, \
                 keys TEXT NOT NULL)",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared("DROP TABLE store_baselines").await?;
        Ok(())
    }
}

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateGrantTables),
            Box::new(PermissionsBelongToMembers),
            Box::new(GroupsAndBundles),
            Box::new(ChangeCounter),
            Box::new(UsageIndex),
            Box::new(WorkloadOwner),
            Box::new(Replicas),
            Box::new(ChangeLog),
            Box::new(StoreBaselines),
            Box::new(WorkloadPlaintext),
        ]
    }
}

/// Which saved workloads still hold a plaintext credential (the field,
/// never the value): migration progress.
pub struct WorkloadPlaintext;

impl MigrationName for WorkloadPlaintext {
    fn name(&self) -> &str {
        "m20261208_000001_workload_plaintext"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for WorkloadPlaintext {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Workloads::Table)
                    .add_column(ColumnDef::new(Workloads::PlaintextFields).text().not_null().default(""))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(Table::alter().table(Workloads::Table).drop_column(Workloads::PlaintextFields).to_owned())
            .await
    }
}

/// An arbitrary constant that names this service's migration lock.
const MIGRATION_LOCK_ID: i64 = 0x1075_ec12_a07b;

/// Holds the SQLite database for this process: another authz-service on the
/// same file is refused at start-up, since decisions are kept in memory and
/// only this process's changes are seen. (Replicas use PostgreSQL.) The
/// lock is released when the returned file is dropped; `None` for
/// PostgreSQL and in-memory databases.
#[expect(clippy::disallowed_methods, reason = "takes the lock once, at startup")]
pub fn lock_sqlite(url: &str) -> anyhow::Result<Option<std::fs::File>> {
    let Some(rest) = url.strip_prefix("sqlite:") else { return Ok(None) };
    let path = rest.trim_start_matches("//").split('?').next().unwrap_or_default();
    if path.is_empty() || path.contains(":memory:") {
        return Ok(None);
    }
    let lock = format!("{path}.lock");
    if let Some(dir) = std::path::Path::new(&lock).parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let file = secrets_common::lockfile::open(std::path::Path::new(&lock))
        .map_err(|e| anyhow::anyhow!("cannot open {lock}: {e}"))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "another authz-service process uses the SQLite database {path}: SQLite serves one process; \
             use PostgreSQL (database_url = \"postgres://...\") to run replicas"
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!("cannot lock {lock}: {e}")),
    }
}

/// Connects and brings the schema up to date (see [`secrets_db::connect`]).
pub async fn connect(url: &str, timeout: Duration, metrics: Option<&Metrics>) -> anyhow::Result<DatabaseConnection> {
    secrets_db::connect::<Migrator>(url, timeout, metrics, MIGRATION_LOCK_ID).await
}
