//! Settings a worker reads on the request path, derived once from the config so that the hot
//! path finds durations, limits and pre-rendered headers ready to use.

use ringway_core::Cidr;
use ringway_core::config::Config;
use ringway_proto::HeadLimits;
use std::time::Duration;

/// A response header to add, pre-rendered.
#[derive(Debug, Clone)]
pub struct AddedHeader {
    pub name: Box<[u8]>,
    pub value: Box<[u8]>,
    pub override_app: bool,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub head: HeadLimits,
    pub body_bytes_max: u64,
    pub connections_max: usize,
    pub requests_per_connection_max: u64,
    pub buffer_bytes: usize,
    pub body_buffer_bytes: usize,
    pub buffer_pool_max: usize,

    pub header_read: Duration,
    pub keepalive_idle: Duration,
    pub hot_read: Duration,
    pub park_idle: bool,
    pub tls_handshake: Duration,
    /// Port for redirects to HTTPS (None: 443, left out of the URL).
    pub https_redirect_port: Option<u16>,
    pub body_read: Duration,
    pub client_write: Duration,
    pub upstream_connect: Duration,
    pub upstream_read: Duration,
    pub upstream_write: Duration,
    pub tunnel_idle: Duration,

    pub idle_per_upstream_max: usize,
    pub upstream_idle_timeout: Duration,
    pub retry_idempotent: bool,
    pub interim_responses_max: usize,

    /// Request bodies up to this size are read before an upstream connection is taken.
    pub request_buffer_bytes: usize,
    pub body_total: Duration,
    /// Rate floors: client sending a body, client taking a response.
    pub body_pace: Option<crate::pace::Floor>,
    pub response_pace: Option<crate::pace::Floor>,
    pub connections_per_client_max: usize,

    pub trusted_proxies: Vec<Cidr>,
    /// PROXY protocol headers are read from connections of these peers (and required).
    pub proxy_protocol: bool,
    pub proxy_protocol_from: Vec<Cidr>,
    pub request_id_in_response: bool,
    pub security_headers: Vec<AddedHeader>,
    pub untrusted_strip: crate::headers::NameSet,
    /// Lower case.
    pub upgrade_protocols: Vec<Box<[u8]>>,

    /// Challenge pass and nonce keys (the same for every worker of the process).
    pub challenge_keys: crate::challenge::Keys,
    pub session_idle_s: u64,
    pub visitor_ttl_s: u64,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        let ms = Duration::from_millis;
        let t = &c.timeouts;
        Self {
            proxy_protocol: c.listen.proxy_protocol,
            proxy_protocol_from: c.listen.proxy_protocol_from.clone(),
            challenge_keys: crate::challenge::Keys::new(&c.policy.challenge_keys),
            session_idle_s: c.policy.session_idle_s,
            visitor_ttl_s: c.policy.visitor_ttl_s,
            head: c.limits.head_limits(),
            body_bytes_max: c.limits.body_bytes_max,
            connections_max: c.limits.connections_per_worker_max,
            requests_per_connection_max: c.limits.requests_per_connection_max,
            buffer_bytes: c.limits.buffer_bytes,
            body_buffer_bytes: c.limits.body_buffer_bytes,
            buffer_pool_max: c.limits.buffer_pool_max,
            header_read: ms(t.header_read_ms),
            keepalive_idle: ms(t.keepalive_idle_ms),
            hot_read: ms(t.hot_read_ms),
            park_idle: c.workers.park_idle,
            tls_handshake: ms(c.tls.handshake_timeout_ms),
            https_redirect_port: c
                .tls
                .redirect_port
                .or(c.listen.https.map(|a| a.port()))
                .filter(|p| *p != 443),
            body_read: ms(t.body_read_ms),
            client_write: ms(t.client_write_ms),
            upstream_connect: ms(t.upstream_connect_ms),
            upstream_read: ms(t.upstream_read_ms),
            upstream_write: ms(t.upstream_write_ms),
            tunnel_idle: ms(t.tunnel_idle_ms),
            idle_per_upstream_max: c.upstream.idle_per_upstream_max,
            upstream_idle_timeout: ms(c.upstream.idle_timeout_ms),
            retry_idempotent: c.upstream.retry_idempotent,
            interim_responses_max: c.limits.interim_responses_max,
            request_buffer_bytes: c.limits.request_buffer_bytes,
            body_total: ms(t.body_total_ms),
            body_pace: crate::pace::Floor::new(
                c.limits.request_body_rate_min_bytes_per_s,
                ms(t.min_rate_grace_ms),
            ),
            response_pace: crate::pace::Floor::new(
                c.limits.response_rate_min_bytes_per_s,
                ms(t.min_rate_grace_ms),
            ),
            connections_per_client_max: c.limits.connections_per_client_max,
            untrusted_strip: crate::headers::NameSet::new(&c.headers.untrusted_strip),
            upgrade_protocols: c
                .headers
                .upgrade_protocols
                .iter()
                .map(|p| p.to_ascii_lowercase().into_bytes().into_boxed_slice())
                .collect(),
            trusted_proxies: c.headers.trusted_proxies.clone(),
            request_id_in_response: c.headers.request_id_in_response,
            security_headers: c
                .headers
                .security
                .iter()
                .map(|h| AddedHeader {
                    name: h.name.as_bytes().into(),
                    value: h.value.as_bytes().into(),
                    override_app: h.override_app,
                })
                .collect(),
        }
    }
}
