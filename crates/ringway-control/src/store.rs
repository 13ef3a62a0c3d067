//! Route stores: where routes come from.
//!
//! A store hands the control plane a stream of [`StoreEvent`]s: a full snapshot first (and
//! after any resync), then incremental changes if the store can follow them. The control plane
//! applies them to the shared route table. A store that cannot produce a valid snapshot returns
//! an error; the table keeps its last good routes.

use ringway_core::route::Route;
use ringway_core::snapshot::Snapshot;
use std::sync::Arc;

/// A change to apply to the route table.
#[derive(Debug, Clone)]
pub enum StoreEvent {
    /// The complete state: the tables are made equal to it.
    Full(Snapshot),
    /// One host pattern added or changed.
    Upsert(String, Arc<Route>),
    /// One host pattern removed.
    Remove(String),
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
}
