//! Everything a store publishes in one go.

use crate::balance::Registry;
use crate::balance::stats::RouteStats;
use crate::policy::{PolicySet, PolicyTable, RateLimiter};
use crate::route::{RouteSet, RouteTable};
use crate::tls::{AcmeTable, CertSet, CertTable};
use std::collections::HashMap;
use std::sync::Arc;

/// A complete state from a route store: routes, certificates, ACME challenge answers.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub routes: RouteSet,
    pub certs: CertSet,
    /// ACME HTTP-01 token to key authorization.
    pub acme: HashMap<String, Box<str>>,
    /// Edge policies by project and by host.
    pub policies: PolicySet,
}

/// The lock-free tables a store fills and the workers read.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub routes: Arc<RouteTable>,
    pub certs: Arc<CertTable>,
    pub acme: Arc<AcmeTable>,
    pub policies: Arc<PolicyTable>,
    /// Rate-limit state shared by every worker (not filled by stores).
    pub limiter: Arc<RateLimiter>,
    /// Endpoint health and load, shared by every worker (slots assigned by the control
    /// thread as it binds routes).
    pub registry: Arc<Registry>,
    /// Per-route counters (slots assigned with the routes).
    pub route_stats: Arc<RouteStats>,
}

impl Tables {
    /// Makes every table equal to `snap`.
    pub fn apply(&self, snap: &Snapshot) {
        self.routes.apply(&snap.routes);
        self.certs.apply(&snap.certs);
        self.acme.apply(&snap.acme);
        self.policies.apply(&snap.policies);
    }
}
