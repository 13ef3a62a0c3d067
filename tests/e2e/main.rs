//! End-to-end tests: a real proxy (in this process, or the `ringway` binary) between real
//! sockets, against upstreams started by the tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod balance;
mod basics;
mod bodies;
mod hardening;
mod policy;
mod postgres;
mod process;
mod reload;
mod smuggling;
mod support;
mod tls;
mod upstream;
mod websocket;
