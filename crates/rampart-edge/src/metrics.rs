//! Prometheus metrics, all prefixed `rampart_`. Per-route handles are looked up
//! once when a config snapshot is built, so the request path only touches atomics.

use crate::reason::Reason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub site: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub site: String,
    pub route: String,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub pool: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub pool: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub pool: String,
    pub backend: String,
    pub check: &'static str,
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

/// A security stage's decision: `stage` (framing, normalize, acl, waf, rate_limit),
/// the reason code, and `action` (block, or log in shadow mode).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecurityLabels {
    pub stage: &'static str,
    pub reason: &'static str,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WafLabels {
    pub rule: String,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

pub struct Metrics {
    pub registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    bytes_in: Family<RouteLabels, Counter>,
    bytes_out: Family<RouteLabels, Counter>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    backend_healthy: Family<BackendLabels, Gauge>,
    health_transitions: Family<TransitionLabels, Counter>,
    panic_requests: Family<PoolLabels, Counter>,
    retries: Family<PoolLabels, Counter>,
    pub open_connections: Family<ListenerLabels, Gauge>,
    pub open_tunnels: Gauge,
    pub parked_connections: Gauge,
    pub connections: Family<ListenerLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub access_log_dropped: Counter,
    cache: crate::cache::Stats,
    pub tls_handshake_failures: Counter,
    security: Family<SecurityLabels, Counter>,
    waf: Family<WafLabels, Counter>,
}

/// Handles for one route: incrementing them is lock-free.
#[derive(Clone)]
pub struct RouteMetrics {
    /// Indexed by status class: 1xx .. 5xx.
    by_class: [Counter; 5],
    pub duration: Histogram,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
}

impl RouteMetrics {
    pub fn count_status(&self, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[i].inc();
    }
}

/// Handles for one pool.
#[derive(Clone)]
pub struct PoolMetrics {
    errors: Arc<[(Reason, Counter)]>,
    /// Requests balanced in panic mode (ignoring health).
    pub panic: Counter,
    /// Attempts retried.
    pub retries: Counter,
}

impl PoolMetrics {
    pub fn upstream_error(&self, reason: Reason) {
        if let Some((_, c)) = self.errors.iter().find(|(r, _)| *r == reason) {
            c.inc();
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("rampart");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by site, route and status class",
            requests.clone(),
        );
        let duration = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response body",
            duration.clone(),
        );
        let bytes_in = Family::<RouteLabels, Counter>::default();
        registry.register(
            "request_body_bytes",
            "Request body bytes received from clients",
            bytes_in.clone(),
        );
        let bytes_out = Family::<RouteLabels, Counter>::default();
        registry.register(
            "response_body_bytes",
            "Response body bytes sent to clients",
            bytes_out.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed upstream exchanges, by pool and reason",
            upstream_errors.clone(),
        );
        let backend_healthy = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_healthy",
            "1 when a backend passes active checks and its circuit is not open",
            backend_healthy.clone(),
        );
        let health_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "backend_health_transitions",
            "Backend health changes, by check (active, passive) and new state",
            health_transitions.clone(),
        );
        let panic_requests = Family::<PoolLabels, Counter>::default();
        registry.register(
            "pool_panic_requests",
            "Requests balanced across unhealthy backends because too few were healthy",
            panic_requests.clone(),
        );
        let retries = Family::<PoolLabels, Counter>::default();
        registry.register("upstream_retries", "Failed attempts retried, by pool", retries.clone());
        let open_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "Client connections currently open",
            open_connections.clone(),
        );
        let open_tunnels = Gauge::default();
        registry.register(
            "open_tunnels",
            "Upgraded connections (WebSocket and others) currently tunnelled",
            open_tunnels.clone(),
        );
        let parked_connections = Gauge::default();
        registry.register(
            "parked_connections",
            "Idle HTTP/1 connections waiting for a request with no HTTP state: plain ones keep only the socket, TLS ones their session",
            parked_connections.clone(),
        );
        let connections = Family::<ListenerLabels, Counter>::default();
        registry.register("connections", "Client connections accepted", connections.clone());
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register("config_reloads", "Configuration reloads, by result", reloads.clone());
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        let cache = crate::cache::Stats::default();
        for (name, help, c) in [
            (
                "cache_hits",
                "Responses served from a fresh stored response",
                &cache.hit,
            ),
            ("cache_misses", "Requests with nothing usable stored", &cache.miss),
            (
                "cache_expired",
                "Stale stored responses fetched again in full",
                &cache.expired,
            ),
            (
                "cache_revalidations",
                "Stale stored responses the origin confirmed with 304",
                &cache.revalidated,
            ),
            (
                "cache_stale_served",
                "Stale responses served because the origin failed",
                &cache.stale,
            ),
            (
                "cache_bypasses",
                "Requests the cache does not serve (unsafe methods)",
                &cache.bypass,
            ),
            ("cache_stored", "Responses stored", &cache.stored),
            (
                "cache_evictions",
                "Stored responses evicted to make room (memory tier)",
                &cache.evicted,
            ),
            (
                "cache_disk_evictions",
                "Stored responses evicted from the disk tier to keep it within disk_size",
                &cache.disk_evicted,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        registry.register("cache_objects", "URLs stored in the memory tier", cache.objects.clone());
        registry.register("cache_bytes", "Bytes stored in the memory tier", cache.bytes.clone());
        let security = Family::<SecurityLabels, Counter>::default();
        registry.register(
            "security_decisions",
            "Requests a security stage refused (or, in shadow mode, would have), by stage, reason and action",
            security.clone(),
        );
        let waf = Family::<WafLabels, Counter>::default();
        registry.register(
            "waf_rule_matches",
            "WAF rules that matched, by rule id and what they did (block, log, skip, allow)",
            waf.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed",
            tls_handshake_failures.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            duration,
            bytes_in,
            bytes_out,
            upstream_errors,
            backend_healthy,
            health_transitions,
            panic_requests,
            retries,
            open_connections,
            open_tunnels,
            parked_connections,
            connections,
            reloads,
            access_log_dropped,
            cache,
            tls_handshake_failures,
            security,
            waf,
        })
    }

    pub fn route(&self, site: &str, route: &str) -> RouteMetrics {
        let labels = RouteLabels {
            site: site.to_string(),
            route: route.to_string(),
        };
        let class = |c: &'static str| {
            self.requests
                .get_or_create(&RequestLabels {
                    site: site.to_string(),
                    route: route.to_string(),
                    class: c,
                })
                .clone()
        };
        RouteMetrics {
            by_class: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            duration: self.duration.get_or_create(&labels).clone(),
            bytes_in: self.bytes_in.get_or_create(&labels).clone(),
            bytes_out: self.bytes_out.get_or_create(&labels).clone(),
        }
    }

    pub fn pool(&self, pool: &str) -> PoolMetrics {
        let errors: Vec<(Reason, Counter)> = Reason::ALL
            .iter()
            .filter(|r| r.is_upstream_error())
            .map(|r| {
                let c = self
                    .upstream_errors
                    .get_or_create(&UpstreamErrorLabels {
                        pool: pool.to_string(),
                        reason: r.as_str(),
                    })
                    .clone();
                (*r, c)
            })
            .collect();
        let panic = self
            .panic_requests
            .get_or_create(&PoolLabels { pool: pool.to_string() })
            .clone();
        let retries = self
            .retries
            .get_or_create(&PoolLabels { pool: pool.to_string() })
            .clone();
        PoolMetrics {
            errors: errors.into(),
            panic,
            retries,
        }
    }

    pub fn set_backend_healthy(&self, pool: &str, backend: &str, healthy: bool) {
        self.backend_healthy
            .get_or_create(&BackendLabels {
                pool: pool.to_string(),
                backend: backend.to_string(),
            })
            .set(i64::from(healthy));
    }

    pub fn health_transition(&self, pool: &str, backend: &str, check: &'static str, to: &'static str) {
        self.health_transitions
            .get_or_create(&TransitionLabels {
                pool: pool.to_string(),
                backend: backend.to_string(),
                check,
                to,
            })
            .inc();
    }

    /// The cache's counters and gauges (registered in `new`), shared with the store.
    /// Count a security decision.
    pub fn security(&self, stage: &'static str, reason: &'static str, action: &'static str) {
        self.security
            .get_or_create(&SecurityLabels { stage, reason, action })
            .inc();
    }

    /// Count a WAF rule match (rule ids come from the config, so the set is bounded).
    pub fn waf_match(&self, rule: &str, action: &'static str) {
        self.waf
            .get_or_create(&WafLabels {
                rule: rule.to_string(),
                action,
            })
            .inc();
        if action == "log" {
            self.security("waf", Reason::WafBlocked.as_str(), "log");
        }
    }

    pub fn cache_stats(&self) -> crate::cache::Stats {
        self.cache.clone()
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
