//! Test support: a fresh, empty database per test, on either backend.
//!
//! PostgreSQL tests need `PADDOCK_TEST_PG_URL` (an admin URL of a throwaway cluster, set by
//! `scripts/test.sh`). Without it they are skipped with a printed reason, except under
//! `CI=true`, where a missing PostgreSQL is a failure: CI must exercise both backends.

use std::str::FromStr;

use sqlx::Connection;

/// A throwaway database URL: a new SQLite file under `dir`.
pub fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("paddock.db").display())
}

/// Creates a fresh PostgreSQL database and returns its URL, or `None` (test skipped) when
/// no cluster is configured outside CI.
///
/// # Panics
/// Under `CI=true` without `PADDOCK_TEST_PG_URL`, or when the cluster is unreachable.
pub async fn postgres_url() -> Option<String> {
    let Ok(admin) = std::env::var("PADDOCK_TEST_PG_URL") else {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!(
                "PADDOCK_TEST_PG_URL is not set under CI: run the tests through scripts/test.sh"
            );
        }
        eprintln!(
            "skipping PostgreSQL case: PADDOCK_TEST_PG_URL is not set (scripts/test.sh sets it)"
        );
        return None;
    };
    let name = format!("paddock_test_{}", uuid::Uuid::new_v4().simple());
    let opts = sqlx::postgres::PgConnectOptions::from_str(&admin)
        .unwrap_or_else(|e| panic!("bad PADDOCK_TEST_PG_URL: {e}"));
    let mut conn = sqlx::postgres::PgConnection::connect_with(&opts)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PADDOCK_TEST_PG_URL: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("create database: {e}"));
    let _ = conn.close().await;
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}
