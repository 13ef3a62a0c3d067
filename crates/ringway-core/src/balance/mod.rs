//! Load balancing: a route's upstreams (their spec), the endpoints they resolve to (their
//! shared health and per-worker load), and the choice among them.
//!
//! - [`spec`]: what a store says (upstreams, strategy, checks, outlier detection, retries).
//! - [`registry`]: every endpoint's health and load, by slot; the slot allocator.
//! - [`cluster`]: a route's endpoints, built on the control thread; the choice.
//! - [`hash`]: the stable hash, the Maglev table, the smooth round-robin order.
//! - [`stats`]: per-route counters with a series cap.
//!
//! docs/load-balancing.md is the operator's manual.

pub mod cluster;
pub mod hash;
pub mod registry;
pub mod spec;
pub mod stats;

pub use cluster::{Ask, Chosen, Cluster, Member, Unavailable};
pub use registry::{Checked, EndpointRef, FailKind, Registry, Slots};
pub use spec::{ClusterSpec, SpecError, Strategy, UpstreamAddr, UpstreamSpec};
