//! Versioned schema migrations, embedded in the binary.
//!
//! Each migration runs in its own transaction together with the row that records it in
//! `ringway_schema_migrations`, under a transaction-scoped advisory lock, so nodes starting at
//! once apply each exactly once and a failed migration leaves nothing half done. Applying
//! again is a no-op.

use super::PgError;
use tokio_postgres::Client;

/// (version, name, SQL), in order. Never edit one that has shipped: add the next.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "schema",
        include_str!("../../migrations/0001_schema.sql"),
    ),
    (
        2,
        "policies",
        include_str!("../../migrations/0002_policies.sql"),
    ),
    (
        3,
        "upstreams",
        include_str!("../../migrations/0003_upstreams.sql"),
    ),
];

/// Advisory lock key shared by every Ringway node ("ringway" in ASCII).
const LOCK_KEY: i64 = 0x0072_696e_6777_6179;

/// The highest version this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies pending migrations; returns the versions applied (empty: already up to date).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, PgError> {
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        let tx = client
            .transaction()
            .await
            .map_err(PgError::query("begin"))?;
        // Everything, the bookkeeping table included, under the lock: nodes starting
        // together on an empty database take turns.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(PgError::query("advisory lock"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS ringway_schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(PgError::query("creating ringway_schema_migrations"))?;
        let newest: Option<i32> = tx
            .query_one("SELECT max(version) FROM ringway_schema_migrations", &[])
            .await
            .map_err(PgError::query("reading ringway_schema_migrations"))?
            .get(0);
        if let Some(found) = newest.filter(|v| *v > latest()) {
            return Err(PgError::SchemaTooNew {
                found,
                known: latest(),
            });
        }
        let done = tx
            .query_opt(
                "SELECT 1 FROM ringway_schema_migrations WHERE version = $1",
                &[&version],
            )
            .await
            .map_err(PgError::query("reading ringway_schema_migrations"))?
            .is_some();
        if done {
            tx.rollback().await.map_err(PgError::query("rollback"))?;
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|source| PgError::Migration {
                version,
                name,
                source,
            })?;
        tx.execute(
            "INSERT INTO ringway_schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .map_err(PgError::query("recording the migration"))?;
        tx.commit().await.map_err(|source| PgError::Migration {
            version,
            name,
            source,
        })?;
        applied.push(version);
    }
    Ok(applied)
}

/// The schema version of the database (0: none), refusing one newer than this binary.
pub async fn current(client: &Client) -> Result<i32, PgError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('ringway_schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(PgError::query("checking the schema"))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM ringway_schema_migrations", &[])
        .await
        .map_err(PgError::query("reading the schema version"))?
        .get(0);
    let v = v.unwrap_or(0);
    if v > latest() {
        return Err(PgError::SchemaTooNew {
            found: v,
            known: latest(),
        });
    }
    Ok(v)
}
