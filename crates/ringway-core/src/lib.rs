//! Types shared by Ringway's data plane (the per-core workers) and its control plane (the
//! thread that loads routes and drains logs). The two planes meet only here: a route snapshot
//! in a lock-free map, per-worker log rings and counters, and the shutdown flag.
//!
//! `unsafe` is confined to [`logring`], whose single-producer single-consumer discipline is
//! enforced by the types it hands out.
#![deny(unsafe_code)]

pub mod balance;
pub mod cidr;
pub mod config;
pub mod logring;
pub mod policy;
pub mod record;
pub mod route;
pub mod shutdown;
pub mod snapshot;
pub mod stats;
pub mod tls;

pub use cidr::Cidr;
pub use config::{Config, ConfigError};
pub use logring::{LogConsumer, LogProducer, log_ring};
pub use record::{LogEntry, LogRecord};
pub use route::{Route, RouteSet, RouteTable, normalize_host};
pub use shutdown::Shutdown;
pub use stats::{Driver, StatsSnapshot, WorkerStats};
