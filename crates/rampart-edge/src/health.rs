//! Backend health, in two layers that both feed the balancer:
//!
//! - **Active checks** ([`spawn_checker`]): per pool, an HTTP request (method, path or
//!   `auto`, expected statuses, optional Host, timeout) or a TCP connect to every
//!   backend each interval (plus jitter), on a fresh connection. `consecutive_down`
//!   failures mark a backend unhealthy, `consecutive_up` successes healthy again.
//! - **Passive checks** ([`Circuit`]): every proxied exchange reports success or
//!   failure. Consecutive failures, or an error rate over a sliding window with a
//!   minimum request count, open the circuit (eject the backend) for an ejection time
//!   that doubles on each repeated ejection (capped). When it passes, the circuit is
//!   half-open: a limited number of trial requests go through; enough successes close
//!   it, a failure opens it again. A pool never ejects more than its cap.
//!
//! The state machine takes the time as an argument, so tests drive it with their own
//! clock. State lives in the backend registry (keyed by pool and URL), so it survives
//! reloads.

use rampart_config::{HealthCheck, HealthKind, Outlier};
use std::time::{Duration, Instant};

/// Passive health state of one backend.
#[derive(Debug, Clone, PartialEq)]
pub enum CircuitState {
    Closed,
    Open { until: Instant },
    HalfOpen { successes: u32 },
}

/// What a recorded result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Ejected,
    HalfOpen,
    Closed,
}

#[derive(Debug)]
pub struct Circuit {
    pub state: CircuitState,
    consecutive_failures: u32,
    window: Window,
    /// Ejections in a row, for the growing ejection time.
    ejections: u32,
    last_closed: Option<Instant>,
}

const BUCKETS: usize = 10;

/// Request and failure counts over a sliding window, in ten buckets.
#[derive(Debug)]
struct Window {
    width: Duration,
    epoch: Instant,
    buckets: [(u64, u32, u32); BUCKETS], // (bucket number, total, failures)
}

impl Window {
    fn new(width: Duration, now: Instant) -> Window {
        Window {
            width: width.max(Duration::from_millis(10)),
            epoch: now,
            buckets: [(u64::MAX, 0, 0); BUCKETS],
        }
    }

    fn bucket_of(&self, now: Instant) -> u64 {
        let slot = (self.width / BUCKETS as u32).as_nanos().max(1);
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos() / slot).unwrap_or(u64::MAX)
    }

    fn record(&mut self, ok: bool, now: Instant) {
        let n = self.bucket_of(now);
        let b = &mut self.buckets[(n % BUCKETS as u64) as usize];
        if b.0 != n {
            *b = (n, 0, 0);
        }
        b.1 += 1;
        if !ok {
            b.2 += 1;
        }
    }

    /// (requests, failures) within the window ending now.
    fn totals(&self, now: Instant) -> (u32, u32) {
        let n = self.bucket_of(now);
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 <= n && n - b.0 < BUCKETS as u64)
            .fold((0, 0), |(t, f), b| (t + b.1, f + b.2))
    }

    fn clear(&mut self) {
        self.buckets = [(u64::MAX, 0, 0); BUCKETS];
    }
}

impl Circuit {
    pub fn new(cfg: &Outlier, now: Instant) -> Circuit {
        Circuit {
            state: CircuitState::Closed,
            consecutive_failures: 0,
            window: Window::new(cfg.window.get(), now),
            ejections: 0,
            last_closed: None,
        }
    }

    /// Move Open → HalfOpen once the ejection time has passed.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        if let CircuitState::Open { until } = self.state
            && now >= until
        {
            self.state = CircuitState::HalfOpen { successes: 0 };
            return Some(Transition::HalfOpen);
        }
        None
    }

    fn ejection_time(&self, cfg: &Outlier) -> Duration {
        let factor = 1u32 << self.ejections.saturating_sub(1).min(16);
        cfg.ejection_time
            .get()
            .saturating_mul(factor)
            .min(cfg.max_ejection_time.get())
    }

    fn open(&mut self, cfg: &Outlier, now: Instant) {
        // Tripping from closed after staying healthy for the longest ejection time:
        // the growth starts over. (A failed half-open trial never resets it.)
        if matches!(self.state, CircuitState::Closed)
            && self
                .last_closed
                .is_some_and(|t| now.saturating_duration_since(t) >= cfg.max_ejection_time.get())
        {
            self.ejections = 0;
        }
        self.ejections += 1;
        self.state = CircuitState::Open {
            until: now + self.ejection_time(cfg),
        };
        self.consecutive_failures = 0;
        self.window.clear();
    }

    /// Record one exchange. `may_eject` says whether the pool's ejection cap allows
    /// one more ejection.
    pub fn record(&mut self, ok: bool, cfg: &Outlier, now: Instant, may_eject: bool) -> Option<Transition> {
        let ticked = self.tick(now);
        match self.state {
            CircuitState::Open { .. } => ticked,
            CircuitState::HalfOpen { successes } => {
                if ok {
                    let successes = successes + 1;
                    if successes >= cfg.success_threshold {
                        self.state = CircuitState::Closed;
                        self.last_closed = Some(now);
                        self.consecutive_failures = 0;
                        self.window.clear();
                        Some(Transition::Closed)
                    } else {
                        self.state = CircuitState::HalfOpen { successes };
                        ticked
                    }
                } else {
                    // A failed trial re-ejects regardless of the cap: it was already out.
                    self.open(cfg, now);
                    Some(Transition::Ejected)
                }
            }
            CircuitState::Closed => {
                self.window.record(ok, now);
                if ok {
                    self.consecutive_failures = 0;
                    return ticked;
                }
                self.consecutive_failures += 1;
                let by_count = cfg.consecutive_failures > 0 && self.consecutive_failures >= cfg.consecutive_failures;
                let by_rate = cfg.error_rate.is_some_and(|rate| {
                    let (total, failed) = self.window.totals(now);
                    total >= cfg.min_requests && f64::from(failed) >= rate * f64::from(total)
                });
                if (by_count || by_rate) && may_eject {
                    self.open(cfg, now);
                    Some(Transition::Ejected)
                } else {
                    ticked
                }
            }
        }
    }

    /// Close the circuit because the backend was seen to recover (active checks went
    /// from failing to passing). The growth of ejection times is kept.
    pub fn reset(&mut self, now: Instant) -> bool {
        let was_closed = self.state == CircuitState::Closed;
        self.state = CircuitState::Closed;
        self.consecutive_failures = 0;
        self.window.clear();
        self.last_closed = Some(now);
        !was_closed
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, CircuitState::Open { .. })
    }

    pub fn as_str(&self) -> &'static str {
        match self.state {
            CircuitState::Closed => "closed",
            CircuitState::Open { .. } => "open",
            CircuitState::HalfOpen { .. } => "half_open",
        }
    }
}

/// Whether a status is in an `expect` spec such as `"200-399"` or `"200,204,300-302"`.
pub fn status_matches(spec: &str, status: u16) -> bool {
    spec.split(',').map(str::trim).any(|part| match part.split_once('-') {
        Some((lo, hi)) => match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
            (Ok(lo), Ok(hi)) => (lo..=hi).contains(&status),
            _ => false,
        },
        None => part.parse::<u16>().is_ok_and(|c| c == status),
    })
}

pub use checker::{report_transition, spawn_checker};

mod checker {
    use super::*;
    use crate::Shared;
    use crate::upstream::{Backend, Pool};
    use http::{HeaderValue, Method, Request, Uri};
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    pub use report as report_transition;
    use std::sync::{Arc, Weak};

    const AUTO_PATHS: [&str; 4] = ["/health", "/healthz", "/status", "/ping"];

    struct Probe {
        ups: u32,
        downs: u32,
        /// For `path = "auto"`: the first path that answered 2xx.
        found_path: Option<&'static str>,
    }

    /// Called once a pool is in service (at start, or after the reload that built it):
    /// publish its backends' health and start its active checker. The checker
    /// stops by itself when the pool is gone (replaced by a reload and no longer used
    /// by any request).
    pub fn spawn_checker(shared: Weak<Shared>, pool: &Arc<Pool>) {
        if pool.health.is_none() {
            // Checks removed (or never configured): nothing would ever mark a backend
            // healthy again, so the active layer passes.
            for b in &pool.backends {
                b.state.set_active_healthy(true);
            }
        }
        if let Some(s) = shared.upgrade() {
            for b in &pool.backends {
                s.metrics
                    .set_backend_healthy(&pool.name, &b.label, b.state.considered_healthy());
            }
        }
        let Some(cfg) = pool.health.clone() else { return };
        let weak = Arc::downgrade(pool);
        tokio::spawn(async move {
            let mut probes: Vec<Probe> = Vec::new();
            loop {
                let Some(pool) = weak.upgrade() else { return };
                probes.resize_with(pool.backends.len(), || Probe {
                    ups: 0,
                    downs: 0,
                    found_path: None,
                });
                let results = futures_util::future::join_all(
                    pool.backends
                        .iter()
                        .zip(probes.iter())
                        .map(|(b, p)| check_once(&cfg, b, &pool.tls, p.found_path)),
                )
                .await;
                for ((b, probe), (ok, path)) in pool.backends.iter().zip(probes.iter_mut()).zip(results) {
                    let b: &Backend = b;
                    if path.is_some() {
                        probe.found_path = path;
                    }
                    let healthy = b.state.active_healthy();
                    if ok {
                        probe.ups += 1;
                        probe.downs = 0;
                        if !healthy && probe.ups >= cfg.consecutive_up {
                            b.state.set_active_healthy(true);
                            b.state.mark_recovered();
                            // It was seen down and is back: an ejection from the same
                            // outage should not keep it out any longer.
                            if b.state.reset_circuit() {
                                report(&shared, &pool.name, &b.label, &b.state, "passive", "healthy");
                            }
                            report(&shared, &pool.name, &b.label, &b.state, "active", "healthy");
                        }
                    } else {
                        probe.downs += 1;
                        probe.ups = 0;
                        if healthy && probe.downs >= cfg.consecutive_down {
                            b.state.set_active_healthy(false);
                            if cfg.path == "auto" {
                                probe.found_path = None;
                            }
                            report(&shared, &pool.name, &b.label, &b.state, "active", "unhealthy");
                        }
                    }
                }
                drop(pool);
                let jitter = cfg.jitter.get().as_millis();
                let extra = if jitter == 0 {
                    0
                } else {
                    fastrand::u64(..u64::try_from(jitter).unwrap_or(u64::MAX))
                };
                tokio::time::sleep(cfg.interval.get() + Duration::from_millis(extra)).await;
            }
        });
    }

    /// Log, count and expose a health transition.
    pub fn report(
        shared: &Weak<Shared>,
        pool: &str,
        backend: &str,
        state: &crate::balance::BackendState,
        check: &'static str,
        to: &'static str,
    ) {
        tracing::warn!(pool, backend, check, to, "backend health changed");
        if let Some(s) = shared.upgrade() {
            s.metrics.health_transition(pool, backend, check, to);
            s.metrics.set_backend_healthy(pool, backend, state.considered_healthy());
        }
    }

    /// One check; returns whether it passed and, for `auto`, the path that did.
    async fn check_once(
        cfg: &HealthCheck,
        b: &Backend,
        tls: &Arc<rustls::ClientConfig>,
        found: Option<&'static str>,
    ) -> (bool, Option<&'static str>) {
        match cfg.kind {
            HealthKind::Tcp => {
                let ok = tokio::time::timeout(cfg.timeout.get(), tokio::net::TcpStream::connect(b.authority.as_str()))
                    .await
                    .is_ok_and(|r| r.is_ok());
                (ok, None)
            }
            HealthKind::Http if cfg.path == "auto" => {
                if let Some(p) = found {
                    return (http_check(cfg, b, tls, p).await, Some(p));
                }
                for p in AUTO_PATHS {
                    if http_check(cfg, b, tls, p).await {
                        return (true, Some(p));
                    }
                }
                (false, None)
            }
            HealthKind::Http => (http_check(cfg, b, tls, &cfg.path).await, None),
        }
    }

    async fn http_check(cfg: &HealthCheck, b: &Backend, tls: &Arc<rustls::ClientConfig>, path: &str) -> bool {
        // A fresh connection per check (no idle pool), so a backend that stopped
        // accepting connections is noticed even while pooled ones still work.
        let mut http =
            hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(crate::dns::Resolver::shared());
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.timeout.get()));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.as_ref().clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(https);
        let Ok(uri) = Uri::builder()
            .scheme(b.scheme.clone())
            .authority(b.authority.clone())
            .path_and_query(path)
            .build()
        else {
            return false;
        };
        let method = Method::from_bytes(cfg.method.as_bytes()).unwrap_or(Method::GET);
        let mut req = Request::new(Empty::new());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let host = cfg
            .host
            .as_deref()
            .and_then(|h| HeaderValue::from_str(h).ok())
            .unwrap_or_else(|| b.host_value.clone());
        req.headers_mut().insert(http::header::HOST, host);
        req.headers_mut().insert(
            http::header::USER_AGENT,
            HeaderValue::from_static("rampart-health-check"),
        );
        let exchange = async {
            let resp = client.request(req).await.ok()?;
            let status = resp.status().as_u16();
            // Read (and bound) the body so the exchange completes cleanly.
            let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await;
            Some(status)
        };
        match tokio::time::timeout(cfg.timeout.get(), exchange).await {
            Ok(Some(status)) => status_matches(&cfg.expect, status),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_config::Duration as D;

    fn cfg() -> Outlier {
        Outlier {
            enabled: true,
            consecutive_failures: 3,
            error_rate: None,
            window: D::from_secs(10),
            min_requests: 10,
            ejection_time: D::from_secs(10),
            max_ejection_time: D::from_secs(60),
            success_threshold: 2,
            half_open_requests: 1,
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_then_half_open_then_close() {
        let c = cfg();
        let t0 = Instant::now();
        let mut k = Circuit::new(&c, t0);
        assert_eq!(k.record(false, &c, t0, true), None);
        assert_eq!(k.record(false, &c, t0, true), None);
        assert_eq!(k.record(false, &c, t0, true), Some(Transition::Ejected));
        assert!(k.is_open());
        // Still open before the ejection time passes.
        assert_eq!(k.tick(t0 + Duration::from_secs(9)), None);
        assert_eq!(k.tick(t0 + Duration::from_secs(10)), Some(Transition::HalfOpen));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(k.record(true, &c, t1, true), None);
        assert_eq!(k.record(true, &c, t1, true), Some(Transition::Closed));
        assert_eq!(k.state, CircuitState::Closed);
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let c = cfg();
        let t0 = Instant::now();
        let mut k = Circuit::new(&c, t0);
        for _ in 0..10 {
            k.record(false, &c, t0, true);
            k.record(false, &c, t0, true);
            assert_eq!(k.record(true, &c, t0, true), None);
        }
        assert_eq!(k.state, CircuitState::Closed);
    }

    #[test]
    fn repeated_ejections_grow_and_are_capped() {
        let c = cfg();
        let mut t = Instant::now();
        let mut k = Circuit::new(&c, t);
        let mut lengths = Vec::new();
        for _ in 0..5 {
            for _ in 0..3 {
                k.record(false, &c, t, true);
            }
            let CircuitState::Open { until } = k.state else {
                panic!("not open")
            };
            lengths.push(until.duration_since(t).as_secs());
            t = until;
            k.tick(t);
            // The half-open trial fails: ejected again, for longer.
            assert_eq!(k.record(false, &c, t, true), Some(Transition::Ejected));
            let CircuitState::Open { until } = k.state else {
                panic!("not open")
            };
            t = until;
            k.tick(t);
            k.record(true, &c, t, true);
            k.record(true, &c, t, true);
            assert_eq!(k.state, CircuitState::Closed);
        }
        assert_eq!(
            lengths,
            vec![10, 40, 60, 60, 60],
            "10s, then doubled per ejection in a row, capped at 60s"
        );
        // Healthy for the longest ejection time: the growth starts over.
        let later = t + Duration::from_secs(61);
        for _ in 0..3 {
            k.record(false, &c, later, true);
        }
        let CircuitState::Open { until } = k.state else {
            panic!("not open")
        };
        assert_eq!(until.duration_since(later).as_secs(), 10);
    }

    #[test]
    fn error_rate_over_the_window_with_a_minimum() {
        let mut c = cfg();
        c.consecutive_failures = 0;
        c.error_rate = Some(0.5);
        let t0 = Instant::now();
        let mut k = Circuit::new(&c, t0);
        // 4 of 8 failed: half, but under the 10-request minimum.
        for i in 0..8 {
            assert_eq!(k.record(i % 2 == 0, &c, t0, true), None);
        }
        assert_eq!(k.record(true, &c, t0, true), None);
        assert_eq!(k.record(false, &c, t0, true), Some(Transition::Ejected), "5 of 10");
        // Old failures slide out of the window.
        let mut k = Circuit::new(&c, t0);
        for _ in 0..9 {
            k.record(false, &c, t0, true);
        }
        let later = t0 + Duration::from_secs(11);
        for _ in 0..9 {
            assert_eq!(k.record(true, &c, later, true), None);
        }
        assert_eq!(k.record(false, &c, later, true), None, "1 of 10 in the window");
    }

    #[test]
    fn reset_closes_an_open_circuit() {
        let c = cfg();
        let t0 = Instant::now();
        let mut k = Circuit::new(&c, t0);
        for _ in 0..3 {
            k.record(false, &c, t0, true);
        }
        assert!(k.is_open());
        assert!(k.reset(t0 + Duration::from_secs(1)), "it was open");
        assert_eq!(k.state, CircuitState::Closed);
        assert!(!k.reset(t0), "already closed");
    }

    #[test]
    fn the_cap_prevents_ejection() {
        let c = cfg();
        let t0 = Instant::now();
        let mut k = Circuit::new(&c, t0);
        for _ in 0..10 {
            assert_eq!(k.record(false, &c, t0, false), None);
        }
        assert_eq!(k.state, CircuitState::Closed);
    }

    #[test]
    fn expect_specs() {
        assert!(status_matches("200-399", 204));
        assert!(status_matches("200-399", 301));
        assert!(!status_matches("200-399", 404));
        assert!(status_matches("200,204,500-502", 501));
        assert!(!status_matches("200,204", 201));
    }
}
