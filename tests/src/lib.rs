//! The test harness: in-process servers, personas, a Kubernetes API server,
//! log capture and store helpers.

#![allow(
    clippy::disallowed_methods,
    reason = "test set-up may block: it runs before and beside the servers, not in them"
)]

pub mod app;
pub mod kube_server;
pub mod logs;
pub mod oidc;
pub mod openbao;
pub mod payloads;
pub mod pki;
pub mod postgres;
pub mod procs;
pub mod proxy;
pub mod replicated;
pub mod stores;

pub use app::*;

/// A plain HTTP/1.1 GET, for scraping metrics endpoints: (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// One connection to a test database from the test itself, with no pool
/// maintenance task (see `secrets_db::connect`: in sqlx 0.9 it can spin).
pub async fn connect_database(url: &str) -> Result<sea_orm::DatabaseConnection, sea_orm::DbErr> {
    let mut options = sea_orm::ConnectOptions::new(url.to_string());
    options.max_connections(1).idle_timeout(None).max_lifetime(None).sqlx_logging(false);
    sea_orm::Database::connect(options).await
}

/// The value of one sample line in Prometheus text, 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Runs each named `async fn(TestApp)` as two tests: `sqlite` (the default
/// database) and `postgres` (a fresh database on DATABASE_URL's server).
#[macro_export]
macro_rules! on_both_databases {
    // With the app's options from `$options()` (the database is set here).
    (options = $options:ident; $($name:ident),* $(,)?) => {
        $(
            mod $name {
                use integration_tests::*;

                #[tokio::test]
                async fn sqlite() {
                    super::$name(TestApp::spawn_with(super::$options()).await).await
                }

                #[tokio::test]
                async fn postgres() {
                    let Some(db) = integration_tests::postgres::fresh_database().await else { return };
                    let app = TestApp::spawn_with(Options { database_url: Some(db.url.clone()), ..super::$options() }).await;
                    super::$name(app).await;
                    db.drop_database().await;
                }
            }
        )*
    };
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use integration_tests::*;

                #[tokio::test]
                async fn sqlite() {
                    super::$name(TestApp::spawn().await).await
                }

                #[tokio::test]
                async fn postgres() {
                    let Some(db) = integration_tests::postgres::fresh_database().await else { return };
                    let app = TestApp::spawn_with(Options { database_url: Some(db.url.clone()), ..Default::default() }).await;
                    super::$name(app).await;
                    db.drop_database().await;
                }
            }
        )*
    };
}
