//! The PostgreSQL route store.
//!
//! 1. Connect (capped backoff), `LISTEN ringway_changes`, then a full load in one
//!    repeatable-read transaction: domains joined to their deployments, certificates, ACME
//!    challenges. Listening first means no change can fall between the load and the listen.
//! 2. Follow: each notification names a row (see the trigger in the migration); the store
//!    gathers what is pending, re-reads just those rows, and emits one incremental change set
//!    (routes upserted or removed, certificates validated and upserted, ACME tokens).
//! 3. Every `resync_interval`, and whenever notifications were lost (queue overflow,
//!    TRUNCATE, reconnect), a full load again; the tables are made equal to it.
//!
//! After every full load, and at most once a second after changes, the served state is
//! written to the snapshot file. While the database is unreachable nothing is emitted: the
//! workers keep what they have.

use super::snapshot_file::{self, CertSource};
use super::{Backoff, Conn, PgError, connect};
use crate::balance_spec::{BalanceSettings, UpstreamEntry};
use crate::certs;
use crate::file_store::ACME_TOKENS_MAX;
use crate::metrics::ControlStats;
use crate::policy_spec::PolicySpec;
use crate::store::{ChangeSet, PolicyKey, RouteStore, StoreError, StoreEvent};
use futures_util::TryStreamExt;
use ringway_core::balance::Cluster;
use ringway_core::policy::{Policy, PolicySet};
use ringway_core::route::{Hsts, Route, RouteSet, normalize_pattern};
use ringway_core::snapshot::Snapshot;
use ringway_core::tls::{CertEntry, CertSet};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use tokio_postgres::types::ToSql;

/// Notifications gathered into one change set at most.
pub const CHANGES_PER_BATCH_MAX: usize = 1024;
/// Longest a full load may take (a million domains load in about a second), and an
/// incremental read: past it the connection is dropped and the store reconnects.
const FULL_LOAD_TIMEOUT: Duration = Duration::from_secs(300);
const CHANGE_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Changes are written to the snapshot file at most this often.
const SNAPSHOT_DEBOUNCE: Duration = Duration::from_secs(1);

/// Domains with their deployments: upstream rows aggregated once per deployment (not once
/// per domain: a million domains share a few thousand deployments), settings as JSON text.
const DOMAINS_SQL: &str = "WITH ups AS (SELECT deployment_id, jsonb_agg(jsonb_build_object(\
     'address', address, 'weight', weight, 'state', state) ORDER BY id)::text AS list \
     FROM upstreams GROUP BY deployment_id) \
     SELECT d.hostname, d.redirect_https, d.hsts_max_age_s, d.hsts_include_subdomains, \
     d.hsts_preload, d.body_bytes_max, p.id, p.project_id, p.environment_id, p.upstreams, \
     ups.list, p.balancer::text \
     FROM domains d JOIN deployments p ON p.id = d.deployment_id \
     LEFT JOIN ups ON ups.deployment_id = p.id";
const CERTS_SQL: &str = "SELECT domain, cert_pem, key_pem, is_default FROM certificates";

/// Settings of the store.
#[derive(Debug, Clone)]
pub struct PgStoreConfig {
    pub url: String,
    pub connect_timeout: Duration,
    pub resync_interval: Duration,
    pub backoff_max: Duration,
    pub snapshot_path: PathBuf,
}

/// A certificate in service and where it came from.
#[derive(Debug, Clone)]
struct Served {
    entry: Arc<CertEntry>,
    source: CertSource,
}

/// What the store serves now (mirrors the tables, plus certificate sources).
#[derive(Debug, Default)]
struct Model {
    routes: HashMap<String, Arc<Route>>,
    /// By certificate domain.
    certs: HashMap<String, Served>,
    /// Certificate domains whose current row is refused, with the reason.
    refused: BTreeMap<String, &'static str>,
    acme: HashMap<String, Box<str>>,
    /// Policies by row id: where each is published, its spec (for the snapshot file) and
    /// the built policy.
    policies: HashMap<i64, (PolicyKey, PolicySpec, Arc<Policy>)>,
}

impl Model {
    fn policy_set(&self) -> PolicySet {
        let mut set = PolicySet::default();
        for (key, _, p) in self.policies.values() {
            match key {
                PolicyKey::Project(id) => {
                    set.by_project.insert(*id, p.clone());
                }
                PolicyKey::Host(h) => {
                    set.by_host.insert(h.clone(), p.clone());
                }
            }
        }
        set
    }

    fn policy_specs(&self) -> Vec<PolicySpec> {
        self.policies.values().map(|(_, s, _)| s.clone()).collect()
    }

    fn cert_sources(&self) -> Vec<CertSource> {
        self.certs.values().map(|s| s.source.clone()).collect()
    }

    fn refused_list(&self) -> Vec<(String, &'static str)> {
        self.refused.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Rows named by notifications, not yet re-read.
#[derive(Debug, Default)]
struct Pending {
    domain_ids: Vec<i64>,
    hostnames: Vec<String>,
    deployment_ids: Vec<i64>,
    cert_ids: Vec<i64>,
    cert_domains: Vec<String>,
    certs: bool,
    acme: bool,
    policy_ids: Vec<i64>,
    full: bool,
    earliest_us: Option<i64>,
    count: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn note(&mut self, payload: &str) {
        self.count += 1;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
            tracing::warn!(payload, "unreadable change notification; resyncing");
            self.full = true;
            return;
        };
        if let Some(at) = v["at_us"].as_i64() {
            self.earliest_us = Some(self.earliest_us.map_or(at, |e| e.min(at)));
        }
        let id = v["id"].as_i64();
        let old = v["old"].as_str().map(str::to_string);
        match (v["t"].as_str(), v["op"].as_str()) {
            (_, Some("TRUNCATE")) => self.full = true,
            (Some("domains"), _) => {
                self.domain_ids.extend(id);
                self.hostnames.extend(old);
            }
            (Some("deployments"), _) => self.deployment_ids.extend(id),
            (Some("certificates"), _) => {
                self.certs = true;
                self.cert_ids.extend(id);
                self.cert_domains.extend(old);
            }
            (Some("acme_challenges"), _) => self.acme = true,
            (Some("access_policies"), _) => self.policy_ids.extend(id),
            _ => self.full = true,
        }
    }
}

/// A policy row, its IP rules applied, built: (where it is published, spec, policy).
type LoadedPolicy = (PolicyKey, PolicySpec, Arc<Policy>);

/// Reads policies (all, or these ids) with their IP rules.
async fn load_policies(
    client: &impl tokio_postgres::GenericClient,
    ids: Option<&[i64]>,
) -> Result<Vec<(i64, Result<LoadedPolicy, String>)>, PgError> {
    let (rows, rules) = match ids {
        None => (
            client
                .query(
                    "SELECT id, project_id, hostname, policy::text FROM access_policies",
                    &[],
                )
                .await,
            client
                .query("SELECT policy_id, cidr::text, action FROM ip_rules", &[])
                .await,
        ),
        // Outside a transaction (the incremental path): one statement, so the policy and
        // its rules come from one snapshot of the database.
        Some(ids) => (
            client
                .query(
                    "SELECT p.id, p.project_id, p.hostname, p.policy::text, \
                     COALESCE(array_agg(r.cidr::text) FILTER (WHERE r.action = 'allow'), '{}'), \
                     COALESCE(array_agg(r.cidr::text) FILTER (WHERE r.action = 'deny'), '{}') \
                     FROM access_policies p LEFT JOIN ip_rules r ON r.policy_id = p.id \
                     WHERE p.id = ANY($1) GROUP BY p.id",
                    &[&ids],
                )
                .await,
            Ok(Vec::new()),
        ),
    };
    let rows = rows.map_err(PgError::query("loading access policies"))?;
    let rules = rules.map_err(PgError::query("loading IP rules"))?;
    let mut by_policy: HashMap<i64, (Vec<String>, Vec<String>)> = HashMap::new();
    for r in &rules {
        let e = by_policy.entry(r.get::<_, i64>(0)).or_default();
        let cidr: String = r.get(1);
        if r.get::<_, &str>(2) == "allow" {
            e.0.push(cidr);
        } else {
            e.1.push(cidr);
        }
    }
    if ids.is_some() {
        for r in &rows {
            by_policy.insert(r.get(0), (r.get(4), r.get(5)));
        }
    }
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: i64 = r.get(0);
        let project: Option<i64> = r.get(1);
        let host: Option<String> = r.get(2);
        let json: String = r.get(3);
        let built = (|| {
            let mut spec: PolicySpec =
                serde_json::from_str(&json).map_err(|e| format!("policy: {e}"))?;
            spec.project_id = project;
            spec.host = host.clone();
            if let Some((allow, deny)) = by_policy.remove(&id) {
                spec.allow.extend(allow);
                spec.deny.extend(deny);
            }
            let (key, name) = match (project, &host) {
                (Some(p), None) => (PolicyKey::Project(p), format!("project {p}")),
                (None, Some(h)) => {
                    // As the routes file does: one host, normalised as requests' hosts are.
                    let n = ringway_core::route::normalize_pattern(h)
                        .map_err(|e| format!("hostname {h:?}: {e}"))?;
                    if n.starts_with('*') {
                        return Err(format!(
                            "hostname {h:?}: a host policy names one host, not a wildcard"
                        ));
                    }
                    spec.host = Some(n.clone());
                    (PolicyKey::Host(n.clone()), format!("host {n}"))
                }
                _ => return Err("names neither a project nor a host".to_string()),
            };
            let policy = spec.build(&name)?;
            Ok((key, spec, Arc::new(policy)))
        })();
        out.push((id, built));
    }
    Ok(out)
}

/// Why the store woke up.
enum Wake {
    Notified(Option<tokio_postgres::Notification>),
    Resync,
    Snapshot,
    Check,
}

/// Follows PostgreSQL. See the module documentation.
pub struct PgStore {
    cfg: PgStoreConfig,
    conn: Option<Conn>,
    backoff: Backoff,
    model: Model,
    next_resync: Instant,
    snapshot_due: Option<Instant>,
    snapshot_task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<ControlStats>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &super::redact(&self.cfg.url))
            .finish_non_exhaustive()
    }
}

fn params<'a>(
    p: &'a [&'a (dyn ToSql + Sync)],
) -> impl ExactSizeIterator<Item = &'a dyn ToSql> + 'a {
    p.iter().map(|p| *p as &dyn ToSql)
}

/// Reused routes during a full load: domains of one deployment with the same options share
/// one `Route`.
type RouteKey = (i64, bool, Option<i32>, bool, bool, Option<i64>);

fn route_from_row(
    row: &tokio_postgres::Row,
    cache: Option<&mut HashMap<RouteKey, Arc<Route>>>,
) -> Result<(String, Arc<Route>), String> {
    let hostname: String = row.get(0);
    let pattern = normalize_pattern(&hostname).map_err(|e| e.to_string())?;
    let key: RouteKey = (
        row.get(6),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    if let Some(cache) = &cache
        && let Some(r) = cache.get(&key)
    {
        return Ok((pattern, r.clone()));
    }
    let upstreams: Vec<String> = row.get(9);
    let mut entries: Vec<UpstreamEntry> =
        upstreams.into_iter().map(UpstreamEntry::Address).collect();
    let bad = |what: &str, e: serde_json::Error| format!("deployment {}: {what}: {e}", key.0);
    if let Some(rows) = row.get::<_, Option<String>>(10) {
        let rows: Vec<UpstreamEntry> =
            serde_json::from_str(&rows).map_err(|e| bad("upstream rows", e))?;
        entries.extend(rows);
    }
    let settings: BalanceSettings = match row.get::<_, Option<String>>(11) {
        Some(text) => serde_json::from_str(&text).map_err(|e| bad("balancer", e))?,
        None => BalanceSettings::default(),
    };
    let spec = crate::balance_spec::build(&entries, &settings)
        .map_err(|e| format!("deployment {}: {e}", key.0))?;
    let hsts = key.2.map(|max_age| Hsts {
        max_age_s: u32::try_from(max_age).unwrap_or(0),
        include_subdomains: key.3,
        preload: key.4,
    });
    let route = Arc::new(Route {
        name: format!("deployment-{}", key.0).into(),
        project_id: row.get(7),
        environment_id: row.get(8),
        deployment_id: key.0,
        cluster: Arc::new(Cluster::unbound(spec)),
        body_bytes_max: key.5.and_then(|b| u64::try_from(b).ok()),
        redirect_https: key.1,
        hsts,
    });
    if let Some(cache) = cache {
        cache.insert(key, route.clone());
    }
    Ok((pattern, route))
}

/// Validates a certificate row; the names it is served under.
fn cert_from_row(
    row: &tokio_postgres::Row,
    now: i64,
) -> (String, bool, Result<Served, (&'static str, String)>) {
    let domain: String = row.get(0);
    let cert_pem: String = row.get(1);
    let key_pem: String = row.get(2);
    let is_default: bool = row.get(3);
    let hosts = vec![domain.clone()];
    let r = certs::load(
        &domain,
        cert_pem.as_bytes(),
        key_pem.as_bytes(),
        Some(&hosts),
        now,
    )
    .map(|e| Served {
        entry: Arc::new(e),
        source: CertSource {
            name: domain.clone(),
            hosts,
            is_default,
            cert_pem,
            key_pem,
        },
    })
    .map_err(|e| (e.reason(), e.to_string()));
    (domain, is_default, r)
}

impl PgStore {
    pub fn new(cfg: PgStoreConfig, stats: Arc<ControlStats>) -> Self {
        let backoff = Backoff::new(cfg.backoff_max);
        Self {
            next_resync: Instant::now() + cfg.resync_interval,
            cfg,
            conn: None,
            backoff,
            model: Model::default(),
            snapshot_due: None,
            snapshot_task: None,
            stats,
        }
    }

    /// Connects (retrying with backoff) and starts listening.
    async fn ensure_connected(&mut self) {
        while self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            if self.conn.take().is_some() {
                ControlStats::inc(&self.stats.db_errors);
                tracing::warn!(
                    "route store: lost the database connection; serving the last routes while reconnecting"
                );
            }
            self.stats.db_connected.store(0, Ordering::Relaxed);
            match self.open().await {
                Ok(c) => {
                    self.conn = Some(c);
                    self.backoff.reset();
                    self.stats.db_connected.store(1, Ordering::Relaxed);
                    tracing::info!(db = %super::redact(&self.cfg.url), "route store connected");
                }
                Err(e) => {
                    ControlStats::inc(&self.stats.db_errors);
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "route store: database unreachable");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn open(&self) -> Result<Conn, PgError> {
        let c = connect(&self.cfg.url, self.cfg.connect_timeout, true).await?;
        tokio::time::timeout(
            self.cfg.connect_timeout,
            c.client.batch_execute("LISTEN ringway_changes"),
        )
        .await
        .map_err(|_| PgError::Timeout(self.cfg.connect_timeout))?
        .map_err(PgError::query("LISTEN"))?;
        match super::migrate::current(&c.client).await {
            Ok(0) => tracing::error!(
                "the database has no Ringway schema: run `ringway migrate` (or set postgres.migrate_on_start)"
            ),
            Ok(_) => {}
            Err(e @ PgError::SchemaTooNew { .. }) => {
                tracing::warn!(error = %e, "continuing: later migrations are meant to be additive")
            }
            Err(e) => return Err(e),
        }
        Ok(c)
    }

    /// Loads everything in one consistent read.
    async fn full_load(&mut self) -> Result<Snapshot, PgError> {
        let started = std::time::Instant::now();
        let Some(conn) = self.conn.as_mut() else {
            return Err(PgError::Closed);
        };
        let tx = conn
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(PgError::query("begin"))?;
        let mut routes = RouteSet::default();
        let mut cache = HashMap::new();
        let mut bad = 0usize;
        let rows = tx
            .query_raw(DOMAINS_SQL, params(&[]))
            .await
            .map_err(PgError::query("loading domains"))?;
        futures_util::pin_mut!(rows);
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(PgError::query("loading domains"))?
        {
            match route_from_row(&row, Some(&mut cache)) {
                Ok((pattern, r)) => {
                    routes.hosts.insert(pattern, r);
                }
                Err(why) => {
                    bad += 1;
                    if bad <= 10 {
                        tracing::error!("domain {:?} skipped: {why}", row.get::<_, String>(0));
                    }
                }
            }
        }
        if bad > 10 {
            tracing::error!(skipped = bad, "domains skipped in total");
        }
        let now = certs::unix_now();
        let mut model_certs = HashMap::new();
        let mut refused = BTreeMap::new();
        let mut set = CertSet::default();
        for row in tx
            .query(CERTS_SQL, &[])
            .await
            .map_err(PgError::query("loading certificates"))?
        {
            let (domain, is_default, r) = cert_from_row(&row, now);
            match r {
                Ok(s) => {
                    set.by_name.insert(domain.clone(), s.entry.clone());
                    set.entries.insert(domain.clone(), s.entry.clone());
                    if is_default {
                        set.default = Some(s.entry.clone());
                    }
                    model_certs.insert(domain, s);
                }
                Err((reason, why)) => {
                    // A row refused now may have been served before: keep that version.
                    let kept = self.model.certs.get(&domain).cloned();
                    tracing::error!(certificate = %domain, "certificate row refused: {why}{}", if kept.is_some() { "; the previous version stays in service" } else { "" });
                    if let Some(k) = kept {
                        set.by_name.insert(domain.clone(), k.entry.clone());
                        set.entries.insert(domain.clone(), k.entry.clone());
                        if k.source.is_default {
                            set.default = Some(k.entry.clone());
                        }
                        model_certs.insert(domain.clone(), k);
                    }
                    set.refused.push((domain.clone(), reason));
                    refused.insert(domain, reason);
                }
            }
        }
        let mut acme = HashMap::new();
        for row in tx
            .query("SELECT token, key_authorization FROM acme_challenges ORDER BY created_at DESC LIMIT $1", &[&(ACME_TOKENS_MAX as i64)])
            .await
            .map_err(PgError::query("loading ACME challenges"))?
        {
            acme.insert(row.get::<_, String>(0), row.get::<_, String>(1).into_boxed_str());
        }
        let loaded = load_policies(&tx, None).await?;
        let mut policies = HashMap::new();
        for (id, r) in loaded {
            match r {
                Ok(v) => {
                    policies.insert(id, v);
                }
                Err(why) => {
                    // A policy refused now keeps the version in force, if any.
                    ControlStats::inc(&self.stats.policy_refusals);
                    tracing::error!("access policy {id} refused: {why}");
                    if let Some(prev) = self.model.policies.get(&id) {
                        policies.insert(id, prev.clone());
                    }
                }
            }
        }
        tx.commit().await.map_err(PgError::query("commit"))?;
        self.model = Model {
            routes: routes.hosts.clone(),
            certs: model_certs,
            refused,
            acme: acme.clone(),
            policies,
        };
        self.stats
            .full_load_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        ControlStats::inc(&self.stats.full_loads);
        tracing::info!(
            domains = routes.hosts.len(),
            certificates = set.entries.len(),
            ms = started.elapsed().as_millis() as u64,
            "route store: full load"
        );
        Ok(Snapshot {
            routes,
            certs: set,
            acme,
            policies: self.model.policy_set(),
        })
    }

    /// Re-reads the rows `p` names and builds the change set.
    async fn incremental(&mut self, p: Pending) -> Result<ChangeSet, PgError> {
        let Some(conn) = self.conn.as_ref() else {
            return Err(PgError::Closed);
        };
        let mut ch = ChangeSet {
            changed_at_unix_us: p.earliest_us,
            ..ChangeSet::default()
        };
        if !p.domain_ids.is_empty() || !p.deployment_ids.is_empty() || !p.hostnames.is_empty() {
            let sql = format!(
                "{DOMAINS_SQL} WHERE d.hostname = ANY($1) OR d.id = ANY($2) OR d.deployment_id = ANY($3)"
            );
            let rows = conn
                .client
                .query(&sql, &[&p.hostnames, &p.domain_ids, &p.deployment_ids])
                .await
                .map_err(PgError::query("reading changed domains"))?;
            let mut present = HashSet::new();
            for row in &rows {
                match route_from_row(row, None) {
                    Ok((pattern, r)) => {
                        present.insert(pattern.clone());
                        self.model.routes.insert(pattern.clone(), r.clone());
                        ch.route_upserts.push((pattern, r));
                    }
                    Err(why) => {
                        // As in a full load: a domain that cannot be routed is not served.
                        let hostname: String = row.get(0);
                        tracing::error!("domain {hostname:?} not served: {why}");
                        if let Ok(pattern) = normalize_pattern(&hostname) {
                            present.insert(pattern.clone());
                            if self.model.routes.remove(&pattern).is_some() {
                                ch.route_removes.push(pattern);
                            }
                        }
                    }
                }
            }
            for h in p.hostnames {
                let Ok(pattern) = normalize_pattern(&h) else {
                    continue;
                };
                if !present.contains(&pattern) && self.model.routes.remove(&pattern).is_some() {
                    ch.route_removes.push(pattern);
                }
            }
        }
        if p.certs {
            // The default row is always re-read: a change elsewhere may have moved it.
            let sql = format!("{CERTS_SQL} WHERE domain = ANY($1) OR id = ANY($2) OR is_default");
            let rows = conn
                .client
                .query(&sql, &[&p.cert_domains, &p.cert_ids])
                .await
                .map_err(PgError::query("reading changed certificates"))?;
            let now = certs::unix_now();
            let mut present = HashSet::new();
            let mut default: Option<Arc<CertEntry>> = None;
            for row in &rows {
                let (domain, is_default, r) = cert_from_row(row, now);
                present.insert(domain.clone());
                match r {
                    Ok(s) => {
                        self.model.refused.remove(&domain);
                        if is_default {
                            default = Some(s.entry.clone());
                        }
                        let unchanged = self
                            .model
                            .certs
                            .get(&domain)
                            .is_some_and(|old| old.source == s.source);
                        if !unchanged {
                            ch.cert_upserts
                                .push((vec![domain.clone()], s.entry.clone()));
                            self.model.certs.insert(domain, s);
                        }
                    }
                    Err((reason, why)) => {
                        let kept = self.model.certs.get(&domain);
                        tracing::error!(certificate = %domain, "certificate row refused: {why}{}", if kept.is_some() { "; the previous version stays in service" } else { "" });
                        if is_default && let Some(k) = kept {
                            default = Some(k.entry.clone());
                        }
                        self.model.refused.insert(domain, reason);
                        ch.refused_new.push(reason);
                    }
                }
            }
            for d in p.cert_domains {
                if !present.contains(&d) {
                    self.model.refused.remove(&d);
                    if self.model.certs.remove(&d).is_some() {
                        ch.cert_removes.push(d);
                    }
                }
            }
            for s in self.model.certs.values_mut() {
                s.source.is_default = default.as_ref().is_some_and(|d| Arc::ptr_eq(d, &s.entry));
            }
            match default {
                Some(e) => ch.cert_upserts.push((vec![String::new()], e)),
                None => ch.cert_removes.push(String::new()),
            }
            ch.refused_now = Some(self.model.refused_list());
        }
        if p.acme {
            let mut acme = HashMap::new();
            for row in conn
                .client
                .query("SELECT token, key_authorization FROM acme_challenges ORDER BY created_at DESC LIMIT $1", &[&(ACME_TOKENS_MAX as i64)])
                .await
                .map_err(PgError::query("reading ACME challenges"))?
            {
                acme.insert(row.get::<_, String>(0), row.get::<_, String>(1).into_boxed_str());
            }
            self.model.acme = acme.clone();
            ch.acme = Some(acme);
        }
        if !p.policy_ids.is_empty() {
            let mut ids = p.policy_ids;
            ids.sort_unstable();
            ids.dedup();
            let loaded = load_policies(&conn.client, Some(&ids)).await?;
            // Keys whose published policy may change. What is published for each is decided
            // after every row is applied: a policy deleted and another inserted for the same
            // project in one batch must leave the new one in force, whatever the order.
            let mut touched: HashSet<PolicyKey> = HashSet::new();
            let mut present = HashSet::new();
            for (id, r) in loaded {
                present.insert(id);
                match r {
                    Ok((key, spec, policy)) => {
                        if let Some((old, _, _)) = self.model.policies.get(&id) {
                            touched.insert(old.clone());
                        }
                        touched.insert(key.clone());
                        self.model.policies.insert(id, (key, spec, policy));
                    }
                    Err(why) => {
                        ControlStats::inc(&self.stats.policy_refusals);
                        tracing::error!(
                            "access policy {id} refused: {why}; the version in force stays"
                        )
                    }
                }
            }
            for id in ids {
                if !present.contains(&id)
                    && let Some((key, _, _)) = self.model.policies.remove(&id)
                {
                    touched.insert(key);
                }
            }
            let mut publish: HashMap<PolicyKey, Option<Arc<Policy>>> =
                touched.into_iter().map(|k| (k, None)).collect();
            for (key, _, policy) in self.model.policies.values() {
                if let Some(slot) = publish.get_mut(key) {
                    *slot = Some(policy.clone());
                }
            }
            ch.policy_changes.extend(publish);
        }
        ControlStats::inc(&self.stats.incremental_loads);
        Ok(ch)
    }

    /// Writes the snapshot file in the background (skipped while a write is running; the
    /// next change or load writes again).
    fn write_snapshot(&mut self) {
        if self
            .snapshot_task
            .as_ref()
            .is_some_and(|t| !t.is_finished())
        {
            self.snapshot_due = Some(Instant::now() + SNAPSHOT_DEBOUNCE);
            return;
        }
        self.snapshot_due = None;
        let path = self.cfg.snapshot_path.clone();
        let routes = self.model.routes.clone();
        let certs = self.model.cert_sources();
        let acme = self.model.acme.clone();
        let policies = self.model.policy_specs();
        let stats = self.stats.clone();
        self.snapshot_task = Some(tokio::task::spawn_blocking(
            move || match snapshot_file::write(&path, &routes, &certs, &acme, &policies) {
                Ok(()) => {
                    ControlStats::inc(&stats.snapshot_writes);
                    stats
                        .snapshot_written_unix
                        .store(certs::unix_now() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    ControlStats::inc(&stats.snapshot_write_errors);
                    tracing::error!(error = %e, "writing the route snapshot failed");
                }
            },
        ));
    }

    /// Takes the state a snapshot file held (when booting from it) as the current model, so
    /// certificates refused later keep the snapshot's version.
    pub fn seed(&mut self, loaded: &snapshot_file::Loaded) {
        self.model.routes = loaded.snapshot.routes.hosts.clone();
        self.model.acme = loaded.snapshot.acme.clone();
        for c in &loaded.certs {
            if let Some(e) = loaded.snapshot.certs.entries.get(&c.name) {
                self.model.certs.insert(
                    c.name.clone(),
                    Served {
                        entry: e.clone(),
                        source: c.clone(),
                    },
                );
            }
        }
    }

    /// One full load with its bookkeeping, or None (the connection is dropped on error).
    async fn load_all(&mut self) -> Option<StoreEvent> {
        let r = match tokio::time::timeout(FULL_LOAD_TIMEOUT, self.full_load()).await {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout(FULL_LOAD_TIMEOUT)),
        };
        match r {
            Ok(snap) => {
                self.next_resync = Instant::now() + self.cfg.resync_interval;
                self.write_snapshot();
                Some(StoreEvent::Full(snap))
            }
            Err(e) => {
                ControlStats::inc(&self.stats.db_errors);
                tracing::warn!(error = %e, "route store: full load failed; reconnecting");
                self.conn = None;
                None
            }
        }
    }
}

impl RouteStore for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn finish(&mut self) {
        // A write in flight may predate the last change; wait for it, then write what is owed.
        if let Some(t) = self.snapshot_task.take() {
            let _ = t.await;
        }
        if self.snapshot_due.is_some() {
            self.write_snapshot();
            if let Some(t) = self.snapshot_task.take() {
                let _ = t.await;
            }
        }
    }

    async fn next(&mut self) -> Result<StoreEvent, StoreError> {
        loop {
            if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
                self.ensure_connected().await;
                // Whatever happened while disconnected is unknown: reload it all.
                if let Some(ev) = self.load_all().await {
                    return Ok(ev);
                }
                continue;
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            if conn.overflowed.swap(false, Ordering::Relaxed) {
                tracing::warn!("route store: change notifications overflowed; resyncing");
                ControlStats::inc(&self.stats.resyncs);
                if let Some(ev) = self.load_all().await {
                    return Ok(ev);
                }
                continue;
            }
            let Some(rx) = conn.notifications.as_mut() else {
                continue;
            };
            let snapshot_due = self.snapshot_due;
            let next_resync = self.next_resync;
            let wake = tokio::select! {
                n = rx.recv() => Wake::Notified(n),
                _ = tokio::time::sleep_until(next_resync) => Wake::Resync,
                _ = async {
                    match snapshot_due {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => Wake::Snapshot,
                // A dead connection delivers nothing: check now and then.
                _ = tokio::time::sleep(Duration::from_millis(500)) => Wake::Check,
            };
            let first = match wake {
                Wake::Notified(Some(n)) => n,
                Wake::Notified(None) => {
                    // The connection task ended.
                    self.conn = None;
                    continue;
                }
                Wake::Resync => {
                    ControlStats::inc(&self.stats.resyncs);
                    if let Some(ev) = self.load_all().await {
                        return Ok(ev);
                    }
                    continue;
                }
                Wake::Snapshot => {
                    self.write_snapshot();
                    continue;
                }
                Wake::Check => continue,
            };
            let mut pending = Pending::default();
            pending.note(first.payload());
            if let Some(rx) = self.conn.as_mut().and_then(|c| c.notifications.as_mut()) {
                while pending.count < CHANGES_PER_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(n) => pending.note(n.payload()),
                        Err(_) => break,
                    }
                }
            }
            if pending.full {
                ControlStats::inc(&self.stats.resyncs);
                if let Some(ev) = self.load_all().await {
                    return Ok(ev);
                }
                continue;
            }
            if pending.is_empty() {
                continue;
            }
            let r = match tokio::time::timeout(CHANGE_READ_TIMEOUT, self.incremental(pending)).await
            {
                Ok(r) => r,
                Err(_) => Err(PgError::Timeout(CHANGE_READ_TIMEOUT)),
            };
            match r {
                Ok(ch) => {
                    if self.snapshot_due.is_none() {
                        self.snapshot_due = Some(Instant::now() + SNAPSHOT_DEBOUNCE);
                    }
                    return Ok(StoreEvent::Changes(ch));
                }
                Err(e) => {
                    ControlStats::inc(&self.stats.db_errors);
                    tracing::warn!(error = %e, "route store: reading changes failed; reconnecting");
                    self.conn = None;
                }
            }
        }
    }
}
