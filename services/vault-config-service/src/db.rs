//! The configs table and its migration. The database holds configs and
//! references only: credentials live in the domain's store object.

use std::time::Duration;

use sea_orm::DatabaseConnection;
use sea_orm_migration::{MigratorTrait, prelude::*};
use secrets_common::observe::Metrics;

pub mod vault_config {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "vault_configs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub domain: String,
        pub name: String,
        pub bundle: String,
        pub host: String,
        pub path: String,
        pub namespace: String,
        /// PEM; public certificates only.
        pub ca_certificate: String,
        /// `TOKEN` or `APP_ROLE`.
        pub auth_method: String,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod vault_version {
    use sea_orm::entity::prelude::*;

    /// The KV v2 version of a config's secret last seen by the change
    /// detection (a version, never a value): a change is one past it.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "vault_secret_versions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub config_id: String,
        /// Where the config's secret was when the version was seen (host,
        /// namespace and path): a config moved elsewhere starts over.
        pub path: String,
        pub version: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The versions the change detection has seen (see [`vault_version`]).
struct VaultVersions;

impl MigrationName for VaultVersions {
    fn name(&self) -> &str {
        "m20261207_000002_vault_versions"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for VaultVersions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE TABLE vault_secret_versions (config_id VARCHAR(64) PRIMARY KEY, path VARCHAR(4096) NOT NULL, \
                 version BIGINT NOT NULL)",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared("DROP TABLE vault_secret_versions").await?;
        Ok(())
    }
}

#[derive(DeriveIden)]
enum VaultConfigs {
    Table,
    Id,
    Domain,
    Name,
    Bundle,
    Host,
    Path,
    Namespace,
    CaCertificate,
    AuthMethod,
    CreatedAt,
    UpdatedAt,
}

struct CreateVaultConfigs;

impl MigrationName for CreateVaultConfigs {
    fn name(&self) -> &str {
        "m20261129_000001_create_vault_configs"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateVaultConfigs {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(VaultConfigs::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(VaultConfigs::Id).string_len(64).not_null().primary_key())
                    .col(ColumnDef::new(VaultConfigs::Domain).string_len(63).not_null())
                    .col(ColumnDef::new(VaultConfigs::Name).string_len(128).not_null())
                    .col(ColumnDef::new(VaultConfigs::Bundle).string_len(128).not_null())
                    .col(ColumnDef::new(VaultConfigs::Host).string_len(2048).not_null())
                    .col(ColumnDef::new(VaultConfigs::Path).string_len(1024).not_null())
                    .col(ColumnDef::new(VaultConfigs::Namespace).string_len(256).not_null())
                    .col(ColumnDef::new(VaultConfigs::CaCertificate).text().not_null())
                    .col(ColumnDef::new(VaultConfigs::AuthMethod).string_len(16).not_null())
                    .col(ColumnDef::new(VaultConfigs::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(VaultConfigs::UpdatedAt).timestamp_with_time_zone().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_vault_configs_domain_name")
                    .table(VaultConfigs::Table)
                    .col(VaultConfigs::Domain)
                    .col(VaultConfigs::Name)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(VaultConfigs::Table).to_owned()).await
    }
}

pub struct Migrator;

#[derive(DeriveIden)]
enum VaultConfigMigrations {
    Table,
}

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateVaultConfigs),
            // PostgreSQL: the change counter every config write bumps and
            // announces, and the replicas' table (see `crate::rows`).
            Box::new(secrets_db::replicas::Migration {
                name: "m20261207_000001_replicas",
                names: crate::rows::REPLICAS,
            }),
            Box::new(VaultVersions),
        ]
    }

    /// Its own migrations table, so it can share a database with the authz
    /// service.
    fn migration_table_name() -> DynIden {
        VaultConfigMigrations::Table.into_iden()
    }
}

/// An arbitrary constant that names this service's migration lock.
const MIGRATION_LOCK_ID: i64 = 0x1075_ec12_b001;

pub async fn connect(url: &str, timeout: Duration, metrics: Option<&Metrics>) -> anyhow::Result<DatabaseConnection> {
    secrets_db::connect::<Migrator>(url, timeout, metrics, MIGRATION_LOCK_ID).await
}
