//! Ringway's data plane.
//!
//! One worker per core: a pinned thread running its own monoio runtime on io_uring, with its own
//! SO_REUSEPORT listener, upstream pools, buffers and counters. Workers share nothing mutable
//! except the lock-free route table and atomics, never block, and never link the control
//! plane's async runtime or database client.
//!
//! The path of a request, module by module: [`accept`] ([`proxy_protocol`] from configured
//! balancers) → [`conn`] ([`tls`]) → [`proxy`] (head, prepare
//! with [`access`], [`route`] and [`policy`] ([`challenge`]), forward through [`pool`], respond with [`headers`] and
//! [`stream`]) → [`log`](worker::Worker::log) into the worker's ring. `docs/architecture.md`
//! tells the same story with the limits that apply at each step.

pub mod accept;
pub mod access;
pub mod challenge;
pub mod client;
pub mod conn;
pub mod deadline;
pub mod error;
pub mod event;
pub mod headers;
pub mod io;
pub mod pace;
pub mod parking;
pub mod policy;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod route;
pub mod runtime;
pub mod settings;
pub mod stream;
pub mod tls;
pub mod worker;

pub use accept::bind_listeners;
pub use runtime::{TlsSetup, WorkerError, WorkerSpec, Workers, plan_cores, server_config, start};
pub use settings::Settings;
