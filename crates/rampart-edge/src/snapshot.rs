//! The running configuration: one immutable snapshot, built and checked whole
//! from a validated config, then swapped in atomically. Requests in flight keep
//! the snapshot they started with.

use crate::chain::Chain;
use crate::metrics::{Metrics, RouteMetrics};
use crate::routing::{PathMatch, Router};
use crate::security::access::AccessList;
use crate::security::rate_limit::Rule as RateRule;
use crate::upstream::{self, BackendRegistry, Pool};
use http::HeaderValue;
use rampart_config::{Cidr, ConfigErrors, Validated};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub enum Rewrite {
    None,
    Strip,
    Replace(String),
}

pub enum HostMode {
    Preserve,
    Backend,
    Fixed(HeaderValue),
}

pub struct RouteEntry {
    pub site: Arc<str>,
    /// Label for logs and metrics: `/prefix`, `=/exact` or `~/glob/*`.
    pub id: Arc<str>,
    /// `site` and `id` as the access log writes them (encoded once).
    pub site_json: crate::access_log::JsonStr,
    pub id_json: crate::access_log::JsonStr,
    /// The pool serving this route (None for chain routes).
    pub pool: Option<Arc<Pool>>,
    /// The provider chain serving this route (None for pool routes).
    pub chain: Option<Arc<Chain>>,
    /// The pool's fallback, used when it has no healthy backend.
    pub fallback: Option<Arc<Pool>>,
    pub rewrite: Rewrite,
    pub host: HostMode,
    pub websocket: bool,
    pub retry_non_idempotent: bool,
    /// Caching on this route, when enabled.
    /// Shared, so a request holds it with one reference count, not a copy.
    pub cache: Option<Arc<rampart_config::RouteCache>>,
    pub tunnel_idle: Duration,
    pub metrics: RouteMetrics,
    /// The route's access list, checked after the site's.
    pub access: Option<Arc<AccessList>>,
    /// The route's rate limits, checked after the site's.
    pub rate_limits: Vec<Arc<RateRule>>,
}

impl RouteEntry {
    /// The Host a background refresh sends: the route's fixed or preserved host
    /// (`None` means the backend's own).
    pub fn host_for_refresh(&self, client_host: &HeaderValue) -> Option<HeaderValue> {
        match &self.host {
            HostMode::Preserve => Some(client_host.clone()),
            HostMode::Backend => None,
            HostMode::Fixed(v) => Some(v.clone()),
        }
    }
}

pub struct SiteInfo {
    pub name: Arc<str>,
    /// The site's access list, checked before the route's.
    pub access: Option<Arc<AccessList>>,
    /// The site's rate limits, checked before the route's.
    pub rate_limits: Vec<Arc<RateRule>>,
    pub https_redirect: bool,
    pub https_port: u16,
    pub explain: bool,
}

pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri: usize,
    pub max_body: u64,
}

pub struct Snapshot {
    pub version: u64,
    pub loaded_at: SystemTime,
    pub validated: Validated,
    pub router: Router<Arc<RouteEntry>>,
    pub sites: Vec<SiteInfo>,
    pub pools: HashMap<String, Arc<Pool>>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub trusted: Vec<Cidr>,
    pub limits: Limits,
    pub via: bool,
    /// Metrics for requests that matched no route.
    pub unmatched: RouteMetrics,
    /// Rate-limit rules by name (their stores carry over reloads that keep them).
    pub rate_rules: HashMap<String, Arc<RateRule>>,
    /// The custom WAF rules, when there are any.
    pub waf: Option<Arc<crate::security::waf::Waf>>,
    /// The access log this config writes to (`log.access`). Held here, requests reach
    /// it through the snapshot they already hold, with no lookup of their own; a
    /// reload that keeps the target carries the same log over.
    pub log: Arc<crate::access_log::AccessLog>,
}

impl Snapshot {
    /// Every (pool, backend URL) in this snapshot.
    pub fn backend_keys(&self) -> std::collections::HashSet<(String, String)> {
        self.pools
            .values()
            .flat_map(|p| p.backends.iter().map(|b| (p.name.to_string(), b.label.to_string())))
            .collect()
    }

    /// Build a snapshot; pools whose config did not change are carried over from
    /// `previous`, keeping their idle connections and balancing position.
    pub fn build(
        validated: Validated,
        version: u64,
        metrics: &Metrics,
        registry: &BackendRegistry,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, ConfigErrors> {
        let mut errs = ConfigErrors::default();
        let cfg = &validated.config;
        let base = validated.base_dir.clone();

        let mut pools = HashMap::new();
        for (i, p) in cfg.pool.iter().enumerate() {
            let reuse = previous
                .and_then(|s| s.pools.get(&p.name))
                .filter(|old| old.fingerprint == upstream::fingerprint(p, &base));
            match reuse {
                Some(old) => {
                    pools.insert(p.name.clone(), old.clone());
                }
                None => match Pool::build(p, &base, metrics.pool(&p.name), registry) {
                    Ok(pool) => {
                        pools.insert(p.name.clone(), Arc::new(pool));
                    }
                    Err(e) => errs.push(format!("pool[{i}]"), e),
                },
            }
        }

        let mut chains = HashMap::new();
        for (i, c) in cfg.chain.iter().enumerate() {
            match Chain::build(c, &base, registry.worker_slots()) {
                Ok(chain) => {
                    chains.insert(c.name.clone(), Arc::new(chain));
                }
                Err(e) => errs.push(format!("chain[{i}]"), e),
            }
        }

        let tls = match &cfg.server.tls {
            Some(t) => match crate::tls::server_config(&t.certificates, t.http2, &base) {
                Ok(c) => Some(c),
                Err(list) => {
                    for (path, msg) in list {
                        errs.push(path, msg);
                    }
                    None
                }
            },
            None => None,
        };

        let waf = match crate::security::waf::Waf::build(&cfg.waf) {
            Ok(w) if w.is_empty() => None,
            Ok(w) => Some(Arc::new(w)),
            Err(list) => {
                for (path, msg) in list {
                    errs.push(path, msg);
                }
                None
            }
        };
        let mut rate_rules: HashMap<String, Arc<RateRule>> = HashMap::new();
        for (i, r) in cfg.rate_limit.iter().enumerate() {
            if rate_rules.contains_key(&r.name) {
                errs.push(format!("rate_limit[{i}].name"), format!("\"{}\" is used twice", r.name));
                continue;
            }
            let previous_rule = previous.and_then(|s| s.rate_rules.get(&r.name)).map(|r| &**r);
            match RateRule::build(r, i, previous_rule) {
                Ok(rule) => {
                    rate_rules.insert(r.name.clone(), Arc::new(rule));
                }
                Err(list) => {
                    for (path, msg) in list {
                        errs.push(path, msg);
                    }
                }
            }
        }
        let mut limits_for = |names: &[String], at: String| -> Vec<Arc<RateRule>> {
            let mut out = Vec::new();
            for (i, n) in names.iter().enumerate() {
                match rate_rules.get(n) {
                    Some(r) => out.push(r.clone()),
                    None if cfg.rate_limit.iter().any(|r| &r.name == n) => {}
                    None => errs.push(format!("{at}[{i}]"), format!("no rate_limit named \"{n}\"")),
                }
            }
            out
        };
        let mut router = Router::new();
        let mut sites = Vec::with_capacity(cfg.site.len());
        let mut access_errs = Vec::new();
        let mut access = |a: &Option<rampart_config::Access>, at: String| match a {
            None => None,
            Some(a) => match AccessList::build(a, &at) {
                Ok(l) => Some(Arc::new(l)),
                Err(list) => {
                    access_errs.extend(list);
                    None
                }
            },
        };
        for (si, s) in cfg.site.iter().enumerate() {
            let hosts: Vec<String> = s
                .hosts
                .iter()
                .filter_map(|h| rampart_config::normalise_host_pattern(h).ok())
                .collect();
            let name: Arc<str> = Arc::from(
                s.name
                    .clone()
                    .or_else(|| hosts.first().cloned())
                    .unwrap_or_else(|| "default".into())
                    .as_str(),
            );
            let mut routes = Vec::with_capacity(s.route.len());
            for (ri, r) in s.route.iter().enumerate() {
                let route_access = access(&r.access, format!("site[{si}].route[{ri}].access"));
                let route_limits = limits_for(&r.rate_limits, format!("site[{si}].route[{ri}].rate_limits"));
                let pool = r.pool.as_ref().and_then(|p| pools.get(p).cloned());
                let chain = r.chain.as_ref().and_then(|c| chains.get(c).cloned());
                if pool.is_none() && chain.is_none() {
                    continue;
                }
                let (m, id) = if let Some(p) = &r.exact {
                    (PathMatch::Exact(p.clone()), format!("={p}"))
                } else if let Some(g) = &r.glob {
                    (PathMatch::Glob(g.clone()), format!("~{g}"))
                } else {
                    let p = r.path.clone().unwrap_or_else(|| "/".into());
                    (PathMatch::Prefix(p.clone()), p)
                };
                let rewrite = if r.strip_prefix {
                    Rewrite::Strip
                } else if let Some(rw) = &r.rewrite_prefix {
                    Rewrite::Replace(rw.clone())
                } else {
                    Rewrite::None
                };
                let host = match r.host_header.to_ascii_lowercase().as_str() {
                    "preserve" => HostMode::Preserve,
                    "backend" => HostMode::Backend,
                    _ => HostMode::Fixed(
                        HeaderValue::from_str(&r.host_header).unwrap_or(HeaderValue::from_static("invalid")),
                    ),
                };
                let fallback = pool
                    .as_ref()
                    .and_then(|p| p.fallback.as_ref())
                    .and_then(|f| pools.get(f).cloned());
                let entry = RouteEntry {
                    fallback,
                    chain,
                    site: name.clone(),
                    site_json: crate::access_log::JsonStr::new(&name),
                    id_json: crate::access_log::JsonStr::new(&id),
                    metrics: metrics.route(&name, &id),
                    id: Arc::from(id.as_str()),
                    pool,
                    rewrite,
                    host,
                    websocket: r.websocket,
                    retry_non_idempotent: r.retry_non_idempotent,
                    cache: r.cache.clone().filter(|c| c.enabled).map(Arc::new),
                    tunnel_idle: r.tunnel_idle_timeout.get(),
                    access: route_access,
                    rate_limits: route_limits,
                };
                routes.push((m, Arc::new(entry)));
            }
            router.add_site(&hosts, s.default, routes);
            sites.push(SiteInfo {
                access: access(&s.access, format!("site[{si}].access")),
                rate_limits: limits_for(&s.rate_limits, format!("site[{si}].rate_limits")),
                name,
                https_redirect: s.https_redirect,
                https_port: s.https_port.unwrap_or(443),
                explain: s.explain,
            });
        }

        for (path, msg) in access_errs {
            errs.push(path, msg);
        }
        errs.into_result(())?;
        let l = &cfg.server.limits;
        Ok(Snapshot {
            version,
            loaded_at: SystemTime::now(),
            router,
            sites,
            pools,
            tls,
            trusted: validated.trusted_proxies.clone(),
            limits: Limits {
                max_header_bytes: l.max_header_size.as_usize(),
                max_headers: l.max_headers,
                max_uri: l.max_uri_length.as_usize(),
                max_body: l.max_request_body.bytes(),
            },
            via: cfg.server.via,
            unmatched: metrics.route("-", "-"),
            rate_rules,
            waf,
            log: Arc::new(crate::access_log::AccessLog::disabled(
                metrics.access_log_dropped.clone(),
            )),
            validated,
        })
    }
}
