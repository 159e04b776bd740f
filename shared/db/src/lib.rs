//! The database connection every service with a database uses: SQLite by
//! default, PostgreSQL in production, migrations at start-up, every
//! operation bounded, every statement counted.

pub mod replicas;

use std::time::Duration;

use sea_orm::{
    ConnAcquireErr, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, Statement,
    TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use secrets_common::{error::Error, observe::Metrics};

/// Connects and brings the schema up to date with `M`. On PostgreSQL,
/// replicas that start together take turns through the advisory lock
/// `lock_id`. With `metrics`, every statement is counted and timed as a
/// backend call (by its verb: SQL text never reaches a label).
///
/// `timeout` bounds getting a connection from the pool and each statement
/// (PostgreSQL `statement_timeout`, SQLite's busy wait). A SQLite file is
/// created readable by its owner only.
pub async fn connect<M: MigratorTrait>(
    url: &str,
    timeout: Duration,
    metrics: Option<&Metrics>,
    lock_id: i64,
) -> anyhow::Result<DatabaseConnection> {
    connect_with::<M>(url, timeout, metrics, lock_id, Durability::Flushed).await
}

/// When a SQLite commit returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Once the disk has flushed it (`synchronous = FULL`): no
    /// acknowledged write is lost, even to a power cut.
    Flushed,
    /// Once it is in the write-ahead log (`synchronous = NORMAL`): it
    /// survives the process crashing, not the machine losing power. For an
    /// append-only trail written at every resolve. PostgreSQL commits as
    /// the server is configured either way.
    Logged,
}

/// [`connect`], with the SQLite commit `durability`.
pub async fn connect_with<M: MigratorTrait>(
    url: &str,
    timeout: Duration,
    metrics: Option<&Metrics>,
    lock_id: i64,
    durability: Durability,
) -> anyhow::Result<DatabaseConnection> {
    if let Some(path) = sqlite_file(url) {
        create_private_file(std::path::Path::new(path))
            .map_err(|e| anyhow::anyhow!("cannot create the database file of {url}: {e}"))?;
    }
    let mut options = ConnectOptions::new(url.to_string());
    options
        .sqlx_logging(false)
        .connect_timeout(Duration::from_secs(5).max(timeout))
        .acquire_timeout(timeout)
        // No pool maintenance task: in sqlx 0.9 it loops over the idle
        // count without yielding, and that count can wrap below zero for a
        // moment (a release counts its connection after another task took
        // it), leaving a runtime thread spinning for good (sqlx issue 3645,
        // fixed upstream after 0.9.0). Seen here in a test run under load.
        // Connections are kept until they fail instead.
        .idle_timeout(None)
        .max_lifetime(None)
        .map_sqlx_postgres_opts(move |o| o.options([("statement_timeout", timeout.as_millis().to_string())]))
        // WAL: a commit is one append and one sync (still FULL: no
        // acknowledged write is lost on power loss), and readers do not
        // wait for the writer.
        .map_sqlx_sqlite_opts(move |o| {
            o.busy_timeout(timeout)
                .foreign_keys(true)
                .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(match durability {
                    Durability::Flushed => sea_orm::sqlx::sqlite::SqliteSynchronous::Full,
                    Durability::Logged => sea_orm::sqlx::sqlite::SqliteSynchronous::Normal,
                })
        });
    if url.contains(":memory:") {
        options.max_connections(1);
    }
    let mut db =
        Database::connect(options).await.map_err(|e| anyhow::anyhow!("cannot connect to the database: {e}"))?;
    if let Some(metrics) = metrics {
        let metrics = metrics.clone();
        let backend = backend_name(&db);
        db.set_metric_callback(move |info| {
            let verb = info.statement.sql.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
            let operation = match verb.as_str() {
                "select" | "insert" | "update" | "delete" => verb.as_str(),
                // The replicas' own bookkeeping (leases, announcements).
                replicas::MARKER => "replicas",
                // A common table expression, then a select.
                "with" => "select",
                _ => "other",
            };
            metrics.observe_backend(backend, operation, !info.failed, info.elapsed);
        });
    }
    if db.get_database_backend() == DbBackend::Postgres {
        let txn = db.begin().await?;
        txn.execute_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT pg_advisory_xact_lock({lock_id})"),
        ))
        .await?;
        M::up(&db, None).await?;
        txn.commit().await?;
    } else {
        M::up(&db, None).await?;
    }
    Ok(db)
}

/// `DATABASE_URL` from the environment, the usual name, replaces `url`
/// unless the service's own variable `own` (which the configuration loader
/// has read into `url`) is set too.
pub fn url_from_environment(own: &str, url: &mut String) {
    if std::env::var_os(own).is_none()
        && let Ok(from_env) = std::env::var("DATABASE_URL")
    {
        *url = from_env;
    }
}

/// `postgres` or `sqlite`: how errors and metrics name the database.
pub fn backend_name(db: &DatabaseConnection) -> &'static str {
    match db.get_database_backend() {
        DbBackend::Postgres => "postgres",
        DbBackend::Sqlite => "sqlite",
        _ => "database",
    }
}

/// Runs one database operation within `timeout`. A database failure
/// ([`Error::Db`]) is logged and becomes `UNAVAILABLE` naming the database
/// and what went wrong, never the SQL; the operation's other errors pass
/// through. `claim` may first take a failure as an answer of its own (a
/// unique index that decided a race is `ALREADY_EXISTS`, say).
pub async fn bounded<T>(
    db: &DatabaseConnection,
    timeout: Duration,
    operation: impl std::future::Future<Output = Result<T, Error>>,
    claim: impl FnOnce(&DbErr) -> Option<Error>,
) -> Result<T, Error> {
    let backend = backend_name(db);
    match tokio::time::timeout(timeout, operation).await {
        Err(_) => Err(Error::database(backend, format!("did not answer within {} ms", timeout.as_millis()))),
        Ok(Err(Error::Db(e))) => Err(claim(&e).unwrap_or_else(|| failure(backend, timeout, &e))),
        Ok(other) => other,
    }
}

/// What a caller is told of a failed database call: `UNAVAILABLE` naming
/// the database and what went wrong, never the statement. The error itself
/// is logged.
pub fn failure(backend: &'static str, timeout: Duration, e: &DbErr) -> Error {
    tracing::error!(backend, error = %e, "database call failed");
    let message = match e {
        // Every pooled connection is stuck on a database that does not
        // answer: the same failure as a slow statement.
        DbErr::ConnectionAcquire(ConnAcquireErr::Timeout) => {
            format!("did not answer within {} ms", timeout.as_millis())
        }
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => "cannot connect".to_string(),
        _ => "a query failed".to_string(),
    };
    Error::database(backend, message)
}

/// Creates the file (and its directory) with mode 0600 if it does not exist,
/// and tightens an existing file to 0600.
#[expect(clippy::disallowed_methods, reason = "creates the database file once, at startup")]
fn create_private_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

fn sqlite_file(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && !path.contains(":memory:")).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(sqlite_file("sqlite://data/a.db?mode=rwc"), Some("data/a.db"));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://h/db"), None);
    }

    use tonic::Code;

    async fn memory() -> DatabaseConnection {
        Database::connect("sqlite::memory:").await.unwrap()
    }

    fn code(e: Error) -> (Code, String) {
        let s = tonic::Status::from(e);
        (s.code(), s.message().to_string())
    }

    #[tokio::test]
    async fn a_database_call_is_bounded_and_its_failure_names_the_database_not_the_sql() {
        let db = memory().await;
        let timeout = Duration::from_millis(50);
        let slow = bounded(&db, timeout, std::future::pending::<Result<(), Error>>(), |_| None).await.unwrap_err();
        assert_eq!(
            code(slow),
            (Code::Unavailable, "database (sqlite) is unavailable: did not answer within 50 ms".into())
        );

        let failing = async { Err::<(), _>(Error::Db(DbErr::Custom("SELECT secret FROM t".into()))) };
        let (c, message) = code(bounded(&db, timeout, failing, |_| None).await.unwrap_err());
        assert_eq!((c, message.as_str()), (Code::Unavailable, "database (sqlite) is unavailable: a query failed"));

        let claimed = async { Err::<(), _>(Error::Db(DbErr::Custom("unique".into()))) };
        let answer = bounded(&db, timeout, claimed, |_| Some(Error::AlreadyExists("that name is taken".into())));
        assert_eq!(code(answer.await.unwrap_err()), (Code::AlreadyExists, "that name is taken".into()));

        let other = async { Err::<(), _>(Error::NotFound("no such row".into())) };
        assert_eq!(code(bounded(&db, timeout, other, |_| None).await.unwrap_err()).0, Code::NotFound, "passes through");
        assert_eq!(bounded(&db, timeout, async { Ok(7) }, |_| None).await.unwrap(), 7);
    }
}
