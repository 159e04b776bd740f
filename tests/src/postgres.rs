//! A fresh PostgreSQL database per test, when DATABASE_URL names a server.

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};

pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

/// `None` when DATABASE_URL is unset; panics when it is set but unusable,
/// so a misconfigured CI fails instead of silently skipping.
pub async fn fresh_database() -> Option<TestDatabase> {
    let admin_url = std::env::var("DATABASE_URL").ok().filter(|u| u.starts_with("postgres"))?;
    let name = format!("authz_it_{}", uuid::Uuid::new_v4().simple());
    let db = Database::connect(&admin_url).await.expect("connect to DATABASE_URL");
    db.execute_raw(Statement::from_string(DbBackend::Postgres, format!("CREATE DATABASE {name}")))
        .await
        .expect("create test database");
    let base = admin_url.split('?').next().unwrap_or(&admin_url);
    let (server, _) = base.rsplit_once('/').expect("DATABASE_URL has a database name");
    Some(TestDatabase { url: format!("{server}/{name}"), admin_url, name })
}

impl TestDatabase {
    pub async fn drop_database(self) {
        if let Ok(db) = Database::connect(&self.admin_url).await {
            let _ = db
                .execute_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
                ))
                .await;
        }
    }
}
