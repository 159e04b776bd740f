//! A fresh PostgreSQL database per test, when DATABASE_URL names a server.

use sea_orm::{ConnectionTrait, DbBackend, Statement};

pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

/// `None` when DATABASE_URL is unset (the test then reports the skip on
/// stderr; `scripts/test.sh` always sets it, starting a throwaway server).
/// Panics when it is set but unusable, and in CI when it is unset, so a
/// misconfigured run fails instead of silently skipping.
pub async fn fresh_database() -> Option<TestDatabase> {
    let Some(admin_url) = std::env::var("DATABASE_URL").ok().filter(|u| u.starts_with("postgres")) else {
        assert!(std::env::var_os("CI").is_none(), "CI must run the PostgreSQL variants: DATABASE_URL is not set");
        eprintln!("SKIP: DATABASE_URL is not set: PostgreSQL variant not run");
        return None;
    };
    let name = format!("authz_it_{}", uuid::Uuid::new_v4().simple());
    let db = crate::connect_database(&admin_url).await.expect("connect to DATABASE_URL");
    db.execute_raw(Statement::from_string(DbBackend::Postgres, format!("CREATE DATABASE {name}")))
        .await
        .expect("create test database");
    let base = admin_url.split('?').next().unwrap_or(&admin_url);
    let (server, _) = base.rsplit_once('/').expect("DATABASE_URL has a database name");
    Some(TestDatabase { url: format!("{server}/{name}"), admin_url, name })
}

impl TestDatabase {
    pub async fn drop_database(self) {
        if let Ok(db) = crate::connect_database(&self.admin_url).await {
            let _ = db
                .execute_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
                ))
                .await;
        }
    }
}

impl TestDatabase {
    /// `host:port` of the server.
    pub fn server_addr(&self) -> String {
        let rest = self.url.split_once("://").map_or(self.url.as_str(), |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or(rest);
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if hostport.contains(':') { hostport.to_string() } else { format!("{hostport}:5432") }
    }

    /// The database's URL, reached through `127.0.0.1:port` instead.
    pub fn url_via(&self, port: u16) -> String {
        self.url.replacen(&self.server_addr(), &format!("127.0.0.1:{port}"), 1)
    }
}
