//! Route stores: where routes come from.
//!
//! A store hands the control plane a stream of [`StoreEvent`]s: a full snapshot first (and
//! after any resync), then incremental changes if the store can follow them. The control plane
//! applies them to the shared route table. A store that cannot produce a valid snapshot returns
//! an error; the table keeps its last good routes.

use ringway_core::route::Route;
use ringway_core::snapshot::Snapshot;
use ringway_core::tls::CertEntry;
use std::collections::HashMap;
use std::sync::Arc;

/// Where a policy is published.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PolicyKey {
    Project(i64),
    Host(String),
}

/// Incremental changes from a store that follows its source row by row (PostgreSQL).
#[derive(Debug, Clone, Default)]
pub struct ChangeSet {
    pub route_upserts: Vec<(String, Arc<Route>)>,
    pub route_removes: Vec<String>,
    /// Certificates by the names they serve (`""`: the default certificate).
    pub cert_upserts: Vec<(Vec<String>, Arc<CertEntry>)>,
    pub cert_removes: Vec<String>,
    /// Policies published (Some) or withdrawn (None), in order.
    pub policy_changes: Vec<(
        PolicyKey,
        Option<std::sync::Arc<ringway_core::policy::Policy>>,
    )>,
    /// The complete ACME token set, when it changed.
    pub acme: Option<HashMap<String, Box<str>>>,
    /// Reasons of certificate rows refused by this change set.
    pub refused_new: Vec<&'static str>,
    /// All certificates refused now, when certificates changed.
    pub refused_now: Option<Vec<(String, &'static str)>>,
    /// When the earliest change was made (Unix microseconds, the source's clock), to measure
    /// change-to-visible latency.
    pub changed_at_unix_us: Option<i64>,
}

/// A change to apply to the route table.
#[derive(Debug, Clone)]
pub enum StoreEvent {
    /// The complete state: the tables are made equal to it.
    Full(Snapshot),
    /// One host pattern added or changed.
    Upsert(String, Arc<Route>),
    /// One host pattern removed.
    Remove(String),
    /// Several changes, applied in order: routes, certificates, ACME tokens.
    Changes(ChangeSet),
}

/// Why a store could not produce routes.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// A source of routes.
#[allow(async_fn_in_trait)]
pub trait RouteStore {
    /// Short name for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Waits for the next change. The first call returns the initial full snapshot.
    async fn next(&mut self) -> Result<StoreEvent, StoreError>;

    /// Called once at shutdown, after the last `next`: finish what must outlive the process
    /// (the database store writes a snapshot file still owed to a debounce).
    async fn finish(&mut self) {}
}
