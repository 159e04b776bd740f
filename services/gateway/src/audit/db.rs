//! The audit database: records, the secrets each named, and each secret's
//! last resolution. Names, outcomes and ids only, never a value.

use std::time::Duration;

use sea_orm::DatabaseConnection;
use sea_orm_migration::{MigratorTrait, prelude::*};
use secrets_common::observe::Metrics;

pub mod audit_record {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_records")]
    pub struct Model {
        /// The gateway replica that wrote it, and its sequence number there.
        #[sea_orm(primary_key, auto_increment = false)]
        pub gateway: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub sequence: i64,
        /// Unix milliseconds.
        pub at_ms: i64,
        pub rpc: String,
        pub caller: String,
        pub principal: String,
        pub domain: String,
        pub workload_kind: String,
        pub workload_id: String,
        /// ALLOWED, DENIED, NOT_FOUND, UNAVAILABLE, INVALID, DROPPED.
        pub decision: String,
        pub trace_id: String,
        pub detail: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit_reference {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_references")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub gateway: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub sequence: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub position: i32,
        /// The record's time, so "who resolved X since T" is one index range.
        pub at_ms: i64,
        pub source_type: String,
        pub source_id: String,
        pub key: String,
        pub version: String,
        pub decision: String,
        pub item: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit_last_access {
    use sea_orm::entity::prelude::*;

    /// The last allowed resolution of a secret by a domain's workloads.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_last_access")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub domain: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub source_type: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub source_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub at_ms: i64,
        pub principal: String,
        pub caller: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

struct CreateAuditTrail;

impl MigrationName for CreateAuditTrail {
    fn name(&self) -> &str {
        "m20261207_000001_audit_trail"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateAuditTrail {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for statement in [
            "CREATE TABLE audit_records (gateway VARCHAR(128) NOT NULL, sequence BIGINT NOT NULL, \
             at_ms BIGINT NOT NULL, rpc VARCHAR(64) NOT NULL, caller VARCHAR(300) NOT NULL, \
             principal VARCHAR(300) NOT NULL, domain VARCHAR(63) NOT NULL, workload_kind VARCHAR(32) NOT NULL, \
             workload_id VARCHAR(128) NOT NULL, decision VARCHAR(16) NOT NULL, trace_id VARCHAR(32) NOT NULL, \
             detail VARCHAR(1024) NOT NULL, PRIMARY KEY (gateway, sequence))",
            // Newest first is (at_ms, sequence, gateway) descending: each
            // index ends with them, so a page is a range scan, never a sort.
            "CREATE INDEX idx_audit_records_at ON audit_records (at_ms, sequence, gateway)",
            "CREATE INDEX idx_audit_records_principal ON audit_records (principal, at_ms, sequence, gateway)",
            "CREATE INDEX idx_audit_records_caller ON audit_records (caller, at_ms, sequence, gateway)",
            "CREATE INDEX idx_audit_records_domain ON audit_records (domain, at_ms, sequence, gateway)",
            "CREATE INDEX idx_audit_records_workload ON audit_records (workload_id, at_ms, sequence, gateway)",
            "CREATE TABLE audit_references (gateway VARCHAR(128) NOT NULL, sequence BIGINT NOT NULL, \
             position INTEGER NOT NULL, at_ms BIGINT NOT NULL, source_type VARCHAR(16) NOT NULL, \
             source_id VARCHAR(64) NOT NULL, key VARCHAR(256) NOT NULL, version VARCHAR(64) NOT NULL, \
             decision VARCHAR(16) NOT NULL, item VARCHAR(1024) NOT NULL, PRIMARY KEY (gateway, sequence, position))",
            "CREATE INDEX idx_audit_references_secret ON audit_references (source_type, source_id, key, at_ms)",
            "CREATE TABLE audit_last_access (domain VARCHAR(63) NOT NULL, source_type VARCHAR(16) NOT NULL, \
             source_id VARCHAR(64) NOT NULL, key VARCHAR(256) NOT NULL, at_ms BIGINT NOT NULL, \
             principal VARCHAR(300) NOT NULL, caller VARCHAR(300) NOT NULL, \
             PRIMARY KEY (domain, source_type, source_id, key))",
        ] {
            db.execute_unprepared(statement).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for table in ["audit_last_access", "audit_references", "audit_records"] {
            db.execute_unprepared(&format!("DROP TABLE {table}")).await?;
        }
        Ok(())
    }
}

pub struct Migrator;

#[derive(DeriveIden)]
enum GatewayMigrations {
    Table,
}

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateAuditTrail)]
    }

    /// Its own migrations table: the audit trail may share a database with
    /// the other services.
    fn migration_table_name() -> DynIden {
        GatewayMigrations::Table.into_iden()
    }
}

/// An arbitrary constant that names the gateway's migration lock.
const MIGRATION_LOCK_ID: i64 = 0x1075_ec12_c0a7;

pub async fn connect(url: &str, timeout: Duration, metrics: Option<&Metrics>) -> anyhow::Result<DatabaseConnection> {
    // SQLite: a record is stored once it is in the write-ahead log (it
    // survives the gateway crashing); waiting for the disk's flush at every
    // resolve would cost more than the resolve.
    secrets_db::connect_with::<Migrator>(url, timeout, metrics, MIGRATION_LOCK_ID, secrets_db::Durability::Logged).await
}
