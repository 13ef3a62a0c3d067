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
//!
//! `unsafe` is denied but for the modules that make raw socket and epoll calls (each block with
//! its `// SAFETY:` comment and a test that runs it). Modules other crates use (the benches, the
//! fuzz targets) are public; the rest are the crate's own.
#![deny(unsafe_code)]

#[allow(unsafe_code)] // raw socket calls, each with its SAFETY comment
pub(crate) mod accept;
pub(crate) mod access;
pub mod challenge;
#[allow(unsafe_code)] // raw socket calls, each with its SAFETY comment
pub(crate) mod client;
pub(crate) mod clients;
pub(crate) mod conn;
pub(crate) mod deadline;
pub(crate) mod error;
pub(crate) mod event;
pub mod headers;
#[allow(unsafe_code)] // raw socket calls, each with its SAFETY comment
pub(crate) mod io;
pub(crate) mod pace;
#[allow(unsafe_code)] // raw socket calls, each with its SAFETY comment
pub(crate) mod parking;
pub mod policy;
#[allow(unsafe_code)] // raw socket calls, each with its SAFETY comment
pub mod pool;
pub(crate) mod proxy;
pub mod proxy_protocol;
pub(crate) mod route;
#[allow(unsafe_code)] // raw socket calls, each with its SAFETY comment
pub(crate) mod runtime;
pub mod settings;
pub(crate) mod stream;
pub(crate) mod tls;
pub(crate) mod worker;

pub use accept::bind_listeners;
pub use runtime::{TlsSetup, WorkerError, WorkerSpec, Workers, plan_cores, server_config, start};
pub use settings::Settings;
