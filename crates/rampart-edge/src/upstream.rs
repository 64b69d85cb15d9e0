//! Upstream pools: backends, balancing, pooled keep-alive connections over
//! HTTP/1.1 or HTTP/2, plain or TLS, and the classification of failures into
//! reason codes.

use crate::balance::{BackendState, Balancer, Candidate, Ring, hash_bytes};
use crate::body::UpstreamBody;
use crate::dns::Resolver;
use crate::metrics::PoolMetrics;
use crate::reason::Reason;
use http::HeaderValue;
use http::uri::{Authority, Scheme};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rampart_config::{AffinityMode, Balance, HashKey, HealthCheck, Outlier, Pool as PoolConfig, Protocol, Timeouts};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector<Resolver>>, UpstreamBody>;

pub struct Backend {
    pub weight: u32,
    /// Opaque id for affinity cookies (from the pool and URL, never the address).
    pub affinity_id: u64,
    slow_start: std::time::Duration,
    /// Runtime state (in flight, drain/disable), kept across reloads.
    pub state: Arc<BackendState>,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `host:port` as a header value, for `host_header = "backend"`.
    pub host_value: HeaderValue,
    /// The URL as configured, for logs and the admin API.
    pub label: Arc<str>,
    /// `label` as the access log writes it (encoded once).
    pub label_json: crate::access_log::JsonStr,
    /// `scheme://authority/`: where the HTTP/1 pool connects.
    pub target: http::Uri,
}

impl Candidate for Backend {
    /// Weights are scaled by 100 so a slow start can ramp even a weight of 1.
    fn weight(&self) -> u32 {
        let w = f64::from(self.weight * 100) * self.state.ramp(self.slow_start);
        (w as u32).max(1)
    }
    fn base_weight(&self) -> u32 {
        self.weight
    }
    fn state(&self) -> &BackendState {
        &self.state
    }
    fn key(&self) -> &str {
        &self.label
    }
}

/// Backend states by (pool, backend URL): what survives a reload.
#[derive(Default)]
pub struct BackendRegistry {
    states: std::sync::Mutex<HashMap<(String, String), Arc<BackendState>>>,
    /// Worker runtimes of the per-core model (0 or 1: one runtime): HTTP/1 pools
    /// keep each one's idle connections apart.
    worker_slots: usize,
}

impl BackendRegistry {
    pub fn with_worker_slots(worker_slots: usize) -> BackendRegistry {
        BackendRegistry {
            worker_slots,
            ..BackendRegistry::default()
        }
    }

    pub fn worker_slots(&self) -> usize {
        self.worker_slots.max(1)
    }

    pub fn get(&self, pool: &str, url: &str) -> Arc<BackendState> {
        let mut m = crate::lock(&self.states);
        m.entry((pool.to_string(), url.to_string())).or_default().clone()
    }

    /// Forget backends that no longer exist, so the map stays bounded by the config.
    pub fn retain(&self, keep: &HashSet<(String, String)>) {
        if let Ok(mut m) = self.states.lock() {
            m.retain(|k, _| keep.contains(k));
        }
    }
}

/// A pool's retry policy, compiled from `[pool.retry]`.
pub struct RetryPolicy {
    pub retries: u32,
    on_connect: bool,
    on_reset: bool,
    on_timeout: bool,
    statuses: Vec<u16>,
    pub per_try_timeout: Option<std::time::Duration>,
    pub replay_limit: usize,
    budget: RetryBudget,
}

impl RetryPolicy {
    fn new(cfg: &rampart_config::Retry) -> RetryPolicy {
        let has = |k: &str| cfg.on.iter().any(|c| c == k);
        RetryPolicy {
            retries: cfg.retries,
            on_connect: has("connect_failure"),
            on_reset: has("reset"),
            on_timeout: has("timeout"),
            statuses: cfg.on.iter().filter_map(|c| c.parse().ok()).collect(),
            per_try_timeout: cfg.per_try_timeout.map(|d| d.get()),
            replay_limit: cfg.replay_limit.as_usize(),
            budget: RetryBudget::new(cfg.budget_percent, cfg.budget_min_per_second),
        }
    }

    /// Whether a failed attempt may be retried by its kind.
    pub fn retries_reason(&self, r: Reason) -> bool {
        match r {
            Reason::UpstreamConnectRefused
            | Reason::UpstreamConnectTimeout
            | Reason::UpstreamConnectError
            | Reason::UpstreamDnsError
            | Reason::UpstreamTlsError => self.on_connect,
            Reason::UpstreamReset | Reason::UpstreamInvalidResponse => self.on_reset,
            Reason::UpstreamHeaderTimeout => self.on_timeout,
            _ => false,
        }
    }

    pub fn retries_status(&self, status: u16) -> bool {
        self.statuses.contains(&status)
    }

    /// Count a request against the budget (every first attempt), at `at`, when it
    /// started.
    pub fn note_request(&self, at: std::time::Instant) {
        self.budget.note_request(at);
    }

    /// Take a retry from the budget, if it allows one.
    pub fn take_retry(&self) -> bool {
        self.budget.take(std::time::Instant::now())
    }
}

/// Retries allowed: `percent` of the requests of the last 10 seconds plus
/// `min_per_second` per second, so a failing pool cannot set off a retry storm.
///
/// Ten one-second slots, each one atomic word: the second (high 32 bits) and its
/// count (low 32 bits). Counting a request is one compare-and-swap, no lock and no
/// clock read (the caller passes the time it has). Taking a retry reads the window
/// and then counts, not as one step: retries taken at the same moment on several
/// threads can overshoot the budget by at most one each.
struct RetryBudget {
    percent: u64,
    floor: u64,
    requests: [std::sync::atomic::AtomicU64; 10],
    retries: [std::sync::atomic::AtomicU64; 10],
    epoch: std::time::Instant,
}

const EMPTY_SLOT: u64 = u64::MAX;

impl RetryBudget {
    fn new(percent: u32, min_per_second: u32) -> RetryBudget {
        RetryBudget {
            percent: u64::from(percent),
            floor: u64::from(min_per_second) * 10,
            requests: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(EMPTY_SLOT)),
            retries: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(EMPTY_SLOT)),
            epoch: std::time::Instant::now(),
        }
    }

    fn second(&self, at: std::time::Instant) -> u64 {
        // Wraps after 136 years of uptime; a wrapped second only restarts a window.
        at.saturating_duration_since(self.epoch).as_secs() & 0xffff_ffff
    }

    /// Add one to second `sec`'s count in `slots`, starting the slot afresh when it
    /// holds an older second.
    fn count(slots: &[std::sync::atomic::AtomicU64; 10], sec: u64) {
        use std::sync::atomic::Ordering;
        let slot = &slots[(sec % 10) as usize];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let next = if cur != EMPTY_SLOT && cur >> 32 == sec {
                cur + u64::from((cur & 0xffff_ffff) < 0xffff_ffff)
            } else {
                (sec << 32) | 1
            };
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    /// The counts in `slots` for the ten seconds up to `sec`.
    fn window(slots: &[std::sync::atomic::AtomicU64; 10], sec: u64) -> u64 {
        slots
            .iter()
            .map(|s| s.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|&v| v != EMPTY_SLOT && sec.saturating_sub(v >> 32) < 10)
            .map(|v| v & 0xffff_ffff)
            .sum()
    }

    fn note_request(&self, at: std::time::Instant) {
        RetryBudget::count(&self.requests, self.second(at));
    }

    fn take(&self, now: std::time::Instant) -> bool {
        let sec = self.second(now);
        let requests = RetryBudget::window(&self.requests, sec);
        let retries = RetryBudget::window(&self.retries, sec);
        if retries < self.floor + requests * self.percent / 100 {
            RetryBudget::count(&self.retries, sec);
            true
        } else {
            false
        }
    }
}

pub struct Pool {
    pub name: Arc<str>,
    pub retry: RetryPolicy,
    pub affinity: Option<crate::affinity::Affinity>,
    /// Ring for header/ip affinity.
    affinity_ring: Option<Ring>,
    /// Name of the pool used when this one has no healthy backend.
    pub fallback: Option<String>,
    pub backends: Vec<Backend>,
    pub balance: Balance,
    balancer: Balancer,
    hash_key: Option<HashKey>,
    pub health: Option<HealthCheck>,
    pub outlier: Outlier,
    panic_threshold: f64,
    in_panic: AtomicBool,
    /// TLS settings towards the backends (also used by active checks).
    pub tls: Arc<rustls::ClientConfig>,
    /// HTTP/2 pools' clients (and cache refreshes'), one per worker runtime.
    pub client: Clients,
    /// HTTP/1.1 connections per backend, for `protocol = "http1"` pools.
    pub h1: Option<crate::h1pool::H1Pool>,
    pub timeouts: Timeouts,
    pub protocol: Protocol,
    pub metrics: PoolMetrics,
    /// The pool's config as JSON: a reload reuses the pool (and its idle connections)
    /// when this is unchanged.
    pub fingerprint: String,
}

impl Pool {
    pub fn build(
        cfg: &PoolConfig,
        base_dir: &Path,
        metrics: PoolMetrics,
        registry: &BackendRegistry,
    ) -> Result<Pool, String> {
        let mut backends = Vec::with_capacity(cfg.backends.len());
        for b in &cfg.backends {
            let uri = rampart_config::check_backend_url(&b.url)?;
            let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
            let authority = uri
                .authority()
                .cloned()
                .ok_or_else(|| format!("`{}` has no host", b.url))?;
            let host_value = HeaderValue::from_str(authority.as_str()).map_err(|e| format!("`{}`: {e}", b.url))?;
            let target = http::Uri::builder()
                .scheme(scheme.clone())
                .authority(authority.clone())
                .path_and_query("/")
                .build()
                .map_err(|e| format!("`{}`: {e}", b.url))?;
            backends.push(Backend {
                weight: b.weight,
                affinity_id: crate::affinity::backend_id(&cfg.name, &b.url),
                slow_start: cfg.slow_start.get(),
                state: registry.get(&cfg.name, &b.url),
                scheme,
                authority,
                host_value,
                label: Arc::from(b.url.as_str()),
                label_json: crate::access_log::JsonStr::new(&b.url),
                target,
            });
        }
        let settings = client_settings(cfg);
        let (client, tls) = build_clients(&settings, base_dir, registry.worker_slots())?;
        // HTTP/1.1 requests through the pool's own per-backend connections (see
        // h1pool); hyper-util's client stays for HTTP/2 and cache refreshes.
        let h1 = match cfg.protocol {
            Protocol::Http1 => Some(crate::h1pool::H1Pool::new(
                build_connector(&settings, base_dir)?.0,
                backends.len(),
                settings.max_idle,
                settings.idle_timeout,
                registry.worker_slots(),
            )),
            Protocol::Http2 => None,
        };
        let balancer = match cfg.balance {
            Balance::RoundRobin => Balancer::round_robin(backends.len()),
            Balance::Random => Balancer::Random,
            Balance::LeastRequest => Balancer::LeastRequest,
            Balance::ConsistentHash => Balancer::consistent_hash(&backends),
        };
        let hash_key = match &cfg.hash_key {
            Some(k) => Some(k.parse::<HashKey>()?),
            None => None,
        };
        let affinity = match &cfg.affinity {
            Some(a) => Some(crate::affinity::Affinity::build(a, &cfg.name, base_dir)?),
            None => None,
        };
        let affinity_ring = affinity
            .as_ref()
            .filter(|a| a.mode != AffinityMode::Cookie)
            .map(|_| Ring::new(&backends));
        Ok(Pool {
            name: Arc::from(cfg.name.as_str()),
            retry: RetryPolicy::new(&cfg.retry),
            affinity,
            affinity_ring,
            fallback: cfg.fallback.clone(),
            backends,
            balance: cfg.balance,
            balancer,
            hash_key,
            health: cfg.health.clone(),
            outlier: cfg.outlier.clone(),
            panic_threshold: cfg.panic_threshold,
            in_panic: AtomicBool::new(false),
            tls,
            client,
            h1,
            timeouts: cfg.timeouts.clone(),
            protocol: cfg.protocol,
            metrics,
            fingerprint: fingerprint(cfg, base_dir),
        })
    }

    /// Choose a backend for a request; `None` when every backend is drained or disabled.
    ///
    /// Unhealthy backends (failed active checks, open circuit) are skipped, unless the
    /// healthy share of the enabled weight is under `panic_threshold`: then the pool is
    /// in panic mode and balances across every enabled backend, as Envoy does, rather
    /// than failing everything.
    pub fn pick(&self, uri: &http::Uri, headers: &http::HeaderMap, client_ip: std::net::IpAddr) -> Option<&Backend> {
        self.pick_avoiding(uri, headers, client_ip, &[]).map(|(_, b)| b)
    }

    /// Whether picking or pinning a backend reads a request header field (a hash
    /// or affinity keyed on one).
    pub fn reads_request_fields(&self) -> bool {
        matches!(self.hash_key, Some(HashKey::Header(_)))
            || self.affinity.as_ref().is_some_and(|a| a.mode == AffinityMode::Header)
    }

    /// Whether any enabled backend is healthy (else a fallback pool takes over).
    pub fn has_healthy(&self) -> bool {
        self.backends
            .iter()
            .any(|b| b.state.available() && b.state.considered_healthy())
    }

    /// The backend a request's session is pinned to, if it can serve it, and whether
    /// the response should (re)pin the client with a cookie.
    pub fn pinned(&self, headers: &http::HeaderMap, client_ip: std::net::IpAddr) -> (Option<usize>, bool) {
        let Some(a) = &self.affinity else {
            return (None, false);
        };
        match a.pin(headers, client_ip) {
            crate::affinity::Pin::Cookie(id) => {
                // Existing sessions stay on a draining backend, not on a disabled or
                // unhealthy one.
                let found = self.backends.iter().position(|b| {
                    b.affinity_id == id
                        && b.state.admin() != crate::balance::AdminState::Disabled
                        && b.state.considered_healthy()
                });
                (found, found.is_none())
            }
            crate::affinity::Pin::Hash(h) => {
                let usable = |b: &Backend| b.state.usable(self.outlier.half_open_requests);
                let i = self
                    .affinity_ring
                    .as_ref()
                    .and_then(|r| r.pick(&self.backends, h, &usable));
                (i, false)
            }
            crate::affinity::Pin::None => (None, a.mode == AffinityMode::Cookie),
        }
    }

    /// Like [`Pool::pick`], but prefer backends not in `tried` (for retries); when
    /// every usable backend was tried, any of them may be picked again.
    pub fn pick_avoiding(
        &self,
        uri: &http::Uri,
        headers: &http::HeaderMap,
        client_ip: std::net::IpAddr,
        tried: &[usize],
    ) -> Option<(usize, &Backend)> {
        if !tried.is_empty() {
            let fresh = |b: &Backend| {
                let i = self.index_of(b);
                !tried.contains(&i) && b.state.usable(self.outlier.half_open_requests)
            };
            if let Some(i) = self.balancer.pick(&self.backends, None, &fresh) {
                return self.backends.get(i).map(|b| (i, b));
            }
        }
        self.pick_inner(uri, headers, client_ip).map(|b| (self.index_of(b), b))
    }

    fn index_of(&self, b: &Backend) -> usize {
        self.backends
            .iter()
            .position(|x| std::ptr::eq(x, b))
            .unwrap_or(usize::MAX)
    }

    fn pick_inner(&self, uri: &http::Uri, headers: &http::HeaderMap, client_ip: std::net::IpAddr) -> Option<&Backend> {
        let hash = self
            .hash_key
            .as_ref()
            .and_then(|k| request_hash(k, uri, headers, client_ip));
        let (mut enabled, mut healthy) = (0u64, 0u64);
        for b in &self.backends {
            if b.state.available() {
                enabled += u64::from(b.weight);
                if b.state.considered_healthy() {
                    healthy += u64::from(b.weight);
                }
            }
        }
        if enabled == 0 {
            return None;
        }
        let panic = (healthy as f64) < self.panic_threshold * enabled as f64;
        if panic != self.in_panic.swap(panic, Ordering::Relaxed) {
            if panic {
                tracing::warn!(pool = %self.name, healthy_weight = healthy, enabled_weight = enabled, "pool in panic mode: balancing across unhealthy backends too");
            } else {
                tracing::info!(pool = %self.name, "pool left panic mode");
            }
        }
        let half_open = self.outlier.half_open_requests;
        let healthy_only = |b: &Backend| b.state.usable(half_open);
        let enabled_only = |b: &Backend| b.state.available();
        let chosen = if panic {
            None
        } else {
            self.balancer.pick(&self.backends, hash, &healthy_only)
        };
        let chosen = match chosen {
            Some(i) => Some(i),
            None => {
                self.metrics.panic.inc();
                self.balancer.pick(&self.backends, hash, &enabled_only)
            }
        };
        chosen.and_then(|i| self.backends.get(i))
    }

    /// Whether one more backend may be ejected under `outlier.max_ejected_percent`.
    pub fn may_eject(&self) -> bool {
        let total = self.backends.len() as u64;
        let ejected = self.backends.iter().filter(|b| b.state.is_ejected()).count() as u64;
        (ejected + 1) * 100 <= u64::from(self.outlier.max_ejected_percent) * total
    }

    pub fn in_panic(&self) -> bool {
        self.in_panic.load(Ordering::Relaxed)
    }

    pub fn balance_name(&self) -> &'static str {
        match self.balance {
            Balance::RoundRobin => "round_robin",
            Balance::Random => "random",
            Balance::LeastRequest => "least_request",
            Balance::ConsistentHash => "consistent_hash",
        }
    }
}

/// The pool's config, plus the contents of its CA file: a reload rebuilds the pool
/// when either changed.
/// The consistent-hash key of a request. A request without the key (no such header,
/// cookie or parameter) gets `None` and is balanced at random.
fn request_hash(key: &HashKey, uri: &http::Uri, headers: &http::HeaderMap, client_ip: std::net::IpAddr) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(crate::balance::hash_ip(client_ip)),
        HashKey::Path => Some(hash_bytes(uri.path().as_bytes())),
        HashKey::Header(name) => headers.get(name.as_str()).map(|v| hash_bytes(v.as_bytes())),
        HashKey::Cookie(name) => crate::headers::cookie(headers, name).map(|v| hash_bytes(v.as_bytes())),
        HashKey::Query(name) => uri
            .query()?
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| hash_bytes(v.as_bytes())),
    }
}

pub fn fingerprint(cfg: &PoolConfig, base_dir: &Path) -> String {
    let mut f = serde_json::to_string(cfg).unwrap_or_default();
    if let Some(ca) = &cfg.tls.ca {
        let bytes = std::fs::read(base_dir.join(ca)).unwrap_or_default();
        let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        f.push_str(&format!("|ca:{h:016x}"));
    }
    f
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// System roots, loaded once per process (reading them is slow).
fn native_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "loading system CA certificates");
            }
            let (added, ignored) = store.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system CA certificates loaded");
            Arc::new(store)
        })
        .clone()
}

/// What an upstream client is built from (a pool's or a chain's settings).
pub struct ClientSettings<'a> {
    pub tls: &'a rampart_config::UpstreamTls,
    pub connect: std::time::Duration,
    pub protocol: Protocol,
    pub max_idle: usize,
    pub idle_timeout: std::time::Duration,
}

fn client_settings(cfg: &PoolConfig) -> ClientSettings<'_> {
    ClientSettings {
        tls: &cfg.tls,
        connect: cfg.timeouts.connect.get(),
        protocol: cfg.protocol,
        max_idle: cfg.max_idle_per_backend,
        idle_timeout: cfg.idle_timeout.get(),
    }
}

/// hyper-util clients towards upstreams, one per worker runtime (the per-core
/// model; one otherwise), each with its own connection pool. A connection's task
/// runs on the runtime that opened it, so a request from another worker would wait
/// for that runtime and cost a cross-thread wake each way (as `h1pool`'s idle
/// lists are kept per worker for the same reason).
pub struct Clients(Box<[UpstreamClient]>);

impl Clients {
    /// The calling worker's client.
    pub fn get(&self) -> &UpstreamClient {
        // Never empty (see `build_clients`).
        &self.0[crate::h1pool::worker_slot().min(self.0.len() - 1)]
    }
}

/// Build `slots` pooled HTTP clients (at least one) with TLS towards upstreams,
/// sharing one connector.
pub fn build_clients(
    cfg: &ClientSettings<'_>,
    base_dir: &Path,
    slots: usize,
) -> Result<(Clients, Arc<rustls::ClientConfig>), String> {
    let (connector, tls) = build_connector(cfg, base_dir)?;
    let clients = (0..slots.max(1))
        .map(|_| {
            let mut cb = Client::builder(TokioExecutor::new());
            cb.pool_max_idle_per_host(cfg.max_idle)
                .pool_idle_timeout(cfg.idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(cfg.protocol == Protocol::Http2);
            cb.build(connector.clone())
        })
        .collect();
    Ok((Clients(clients), tls))
}

pub type Connector = HttpsConnector<HttpConnector<Resolver>>;

/// The connector towards upstreams: DNS, TCP, TLS as configured.
fn build_connector(
    cfg: &ClientSettings<'_>,
    base_dir: &Path,
) -> Result<(Connector, Arc<rustls::ClientConfig>), String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let tls = if cfg.tls.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let roots = match &cfg.tls.ca {
            Some(ca) => {
                let path = if Path::new(ca).is_absolute() {
                    Path::new(ca).to_path_buf()
                } else {
                    base_dir.join(ca)
                };
                let mut store = RootCertStore::empty();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
                    .map_err(|e| format!("tls.ca: cannot read {}: {e}", path.display()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("tls.ca: {}: {e}", path.display()))?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("tls.ca: no usable CA certificate in {}", path.display()));
                }
                Arc::new(store)
            }
            None => native_roots(),
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };

    let mut http = HttpConnector::new_with_resolver(Resolver::shared());
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let tls = Arc::new(tls);
    let b = HttpsConnectorBuilder::new()
        .with_tls_config(tls.as_ref().clone())
        .https_or_http();
    let b = match &cfg.tls.sni {
        Some(name) => {
            let sn = ServerName::try_from(name.clone()).map_err(|e| format!("tls.sni: `{name}`: {e}"))?;
            b.with_server_name_resolver(FixedServerNameResolver::new(sn))
        }
        None => b,
    };
    let connector = match cfg.protocol {
        Protocol::Http1 => b.enable_http1().wrap_connector(http),
        Protocol::Http2 => b.enable_http2().wrap_connector(http),
    };
    Ok((connector, tls))
}

/// Certificate verification turned off (`tls.insecure = true`): the chain is not
/// checked, but handshake signatures still are.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Map a client error to a reason code by walking its source chain.
pub fn classify(err: &hyper_util::client::legacy::Error) -> Reason {
    classify_error(err, err.is_connect())
}

/// The same for an error of the HTTP/1 pool.
pub fn classify_send(err: &crate::h1pool::SendError) -> Reason {
    classify_error(err.as_error(), err.is_connect())
}

fn classify_error(err: &(dyn std::error::Error + 'static), connect: bool) -> Reason {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut fallback = if connect {
        Reason::UpstreamConnectError
    } else {
        Reason::UpstreamReset
    };
    while let Some(e) = src {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return Reason::UpstreamTlsError;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if wraps_tls_error(io) {
                return Reason::UpstreamTlsError;
            }
            match io.kind() {
                ConnectionRefused => return Reason::UpstreamConnectRefused,
                TimedOut if connect => return Reason::UpstreamConnectTimeout,
                TimedOut => return Reason::UpstreamHeaderTimeout,
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
                    return Reason::UpstreamReset;
                }
                _ => {}
            }
        }
        if e.downcast_ref::<crate::h1client::InvalidResponse>().is_some() {
            return Reason::UpstreamInvalidResponse;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
                return Reason::UpstreamInvalidResponse;
            }
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                fallback = Reason::UpstreamReset;
            }
        }
        let text = e.to_string();
        if connect && text.contains("dns error") {
            return Reason::UpstreamDnsError;
        }
        src = e.source();
    }
    fallback
}

/// `io::Error::source()` skips the error it wraps, and connectors nest io errors
/// (Other → InvalidData → rustls::Error), so look inside layer by layer.
fn wraps_tls_error(io: &std::io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + Send + Sync + 'static)> = io.get_ref();
    for _ in 0..8 {
        let Some(e) = cur else { return false };
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        cur = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_budget_counts_a_sliding_ten_seconds() {
        use std::time::Duration;
        // 20 % of the requests, plus 1 per second (10 over the window).
        let b = RetryBudget::new(20, 1);
        let t0 = b.epoch;
        for _ in 0..50 {
            b.note_request(t0);
        }
        // 10 + 50 * 20 / 100 = 20 retries in the window, then none.
        let granted = (0..30).filter(|_| b.take(t0 + Duration::from_millis(500))).count();
        assert_eq!(granted, 20);
        // Nine seconds on, the same second's counts are still in the window.
        assert!(!b.take(t0 + Duration::from_secs(9)));
        // Ten seconds on they have left it: only the floor remains.
        let later = t0 + Duration::from_secs(10);
        assert_eq!((0..30).filter(|_| b.take(later)).count(), 10);
        // A slot reused for a new second starts from one.
        b.note_request(later);
        assert_eq!(RetryBudget::window(&b.requests, b.second(later)), 1);
    }

    #[test]
    fn retry_budget_counts_from_several_threads() {
        let b = std::sync::Arc::new(RetryBudget::new(100, 0));
        let t0 = b.epoch;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        b.note_request(t0);
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(RetryBudget::window(&b.requests, 0), 4000);
    }

    fn pool(backends: &str) -> Option<Pool> {
        let text = format!(
            "[server]\nlisten=[\"127.0.0.1:0\"]\n[[pool]]\nname=\"p\"\nbackends={backends}\n[[site]]\ndefault=true\n[[site.route]]\npath=\"/\"\npool=\"p\"\n"
        );
        let v = rampart_config::load_str(&text, Path::new(".")).ok()?;
        let m = crate::metrics::Metrics::new();
        Pool::build(
            &v.config.pool[0],
            Path::new("."),
            m.pool("p"),
            &BackendRegistry::default(),
        )
        .ok()
    }

    #[tokio::test]
    async fn weighted_round_robin() {
        let p = pool(r#"["http://a:1", { url = "http://b:1", weight = 3 }]"#);
        assert!(p.is_some());
        let Some(p) = p else { return };
        let mut counts = [0usize; 2];
        let (uri, headers) = (http::Uri::default(), http::HeaderMap::new());
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        for _ in 0..400 {
            let b = p
                .pick(&uri, &headers, ip)
                .map(|b| b.label.to_string())
                .unwrap_or_default();
            counts[usize::from(b.contains("//b"))] += 1;
        }
        assert_eq!(counts, [100, 300]);
    }
}
