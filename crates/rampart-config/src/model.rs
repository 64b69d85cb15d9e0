//! The configuration schema as written in TOML. Every struct denies unknown
//! fields so a typo is an error with a suggestion, never silently ignored.

use crate::units::{Duration, Size};
use serde::{Deserialize, Deserializer, Serialize, de};
use std::fmt;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub admin: Option<Admin>,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub cache: CacheSettings,
    #[serde(default)]
    pub pool: Vec<Pool>,
    /// Provider chains: ordered providers (CDNs, mirrors, origins) with failover.
    #[serde(default)]
    pub chain: Vec<Chain>,
    /// Rate-limit rules, applied by the sites and routes that name them.
    #[serde(default)]
    pub rate_limit: Vec<RateLimit>,
    /// Custom WAF rules.
    #[serde(default)]
    pub waf: Waf,
    #[serde(default)]
    pub site: Vec<Site>,
}

/// `[waf]`: custom rules in the Rules-language style, run in order on every request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Waf {
    /// Turn every block into a log entry.
    pub shadow: bool,
    /// How much of a request body the rules may inspect.
    pub body_limit: Size,
    /// What to do with a body longer than `body_limit`.
    pub body_overflow: BodyOverflow,
    pub rule: Vec<WafRule>,
}

impl Default for Waf {
    fn default() -> Self {
        Waf {
            shadow: false,
            body_limit: Size::kib(128),
            body_overflow: BodyOverflow::InspectPrefix,
            rule: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyOverflow {
    /// Inspect the first `body_limit` bytes and let the request through.
    #[default]
    InspectPrefix,
    /// Refuse the request (413).
    Block,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WafRule {
    /// Names the rule in answers, logs and metrics.
    pub id: String,
    pub expression: String,
    pub action: WafAction,
    /// Status of a block (default 403).
    #[serde(default)]
    pub status: Option<u16>,
    /// Body of a block (default: JSON naming the rule and the request id).
    #[serde(default)]
    pub body: Option<String>,
    /// Log instead of blocking.
    #[serde(default)]
    pub shadow: bool,
    /// For `skip`: what to skip, `"rules"` (the remaining rules) and/or `"rate_limit"`.
    #[serde(default)]
    pub skip: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WafAction {
    Block,
    Log,
    Skip,
    Allow,
}

/// `[[rate_limit]]`: a GCRA limit on requests per key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub name: String,
    /// `ip`, `ip_path`, `route`, `header:NAME`, `api_key:NAME` or `cookie:NAME`.
    #[serde(default = "default_rate_key")]
    pub key: String,
    /// Sustained rate: `N/s`, `N/m` or `N/h`.
    pub rate: String,
    /// Requests allowed at once (default: the rate's N).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Count what would be refused, refuse nothing.
    #[serde(default)]
    pub shadow: bool,
    /// Clients never limited by this rule.
    #[serde(default)]
    pub exempt_ips: Vec<String>,
    /// Path prefixes never limited by this rule.
    #[serde(default)]
    pub exempt_paths: Vec<String>,
    /// Most keys tracked at once; past it, new keys share one bucket.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_rate_key() -> String {
    "ip".into()
}

fn default_max_keys() -> usize {
    100_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Chain {
    pub name: String,
    /// In rank order.
    pub providers: Vec<Provider>,
    /// Statuses that count as "blocked" and fail over to the next provider.
    #[serde(default = "default_fail_on_status")]
    pub fail_on_status: Vec<u16>,
    /// What happens when every provider fails.
    #[serde(default)]
    pub origin_fallback: Option<OriginFallback>,
    /// Timeout for a provider that sets none (time to its response head).
    #[serde(default = "default_provider_timeout")]
    pub timeout: Duration,
    /// Scope of per-route health: `"directory"` of the path (default) or the whole `"path"`.
    #[serde(default = "default_route_key")]
    pub route_key: String,
    /// Failures in a row (for one route scope) that put a provider in cooldown there.
    #[serde(default = "default_cooldown_after")]
    pub cooldown_after: u32,
    /// How long a provider in cooldown is tried only after the others.
    #[serde(default = "default_cooldown")]
    pub cooldown: Duration,
    /// Request bodies are kept for failover up to this size.
    #[serde(default = "default_replay")]
    pub replay_limit: Size,
    /// Rank providers by recent failures (a decaying penalty per route scope) as well
    /// as by cooldowns; `false` keeps the configured order apart from cooldowns.
    #[serde(default = "yes")]
    pub adaptive: bool,
    /// Half-life of the failure penalty.
    #[serde(default = "default_half_life")]
    pub penalty_half_life: Duration,
    /// Failures of one provider on one route scope within 5 minutes that raise a
    /// recommendation.
    #[serde(default = "default_recommend_after")]
    pub recommend_after: u32,
    /// How long an approved recommendation's change lasts.
    #[serde(default = "default_recommend_ttl")]
    pub recommend_ttl: Duration,
    #[serde(default)]
    pub tls: UpstreamTls,
}

fn default_fail_on_status() -> Vec<u16> {
    vec![403, 404, 408, 409, 423, 425, 429, 451, 500, 502, 503, 504]
}
fn default_provider_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_route_key() -> String {
    "directory".into()
}
fn default_cooldown_after() -> u32 {
    3
}
fn default_cooldown() -> Duration {
    Duration::from_secs(60)
}
fn default_half_life() -> Duration {
    Duration::from_secs(30)
}
fn default_recommend_after() -> u32 {
    5
}
fn default_recommend_ttl() -> Duration {
    Duration::from_secs(900)
}
fn default_replay() -> Size {
    Size::kib(64)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    /// Base URL; the request path is appended to its path.
    pub url: String,
    /// Time to the response head (default: the chain's `timeout`).
    #[serde(default)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OriginFallback {
    pub url: String,
    /// Whether the origin may be fetched when every provider failed.
    #[serde(default)]
    pub allowed: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Plain HTTP listeners (`host:port`).
    pub listen: Vec<String>,
    /// TLS listeners; certificates are chosen by SNI and HTTP/2 is offered via ALPN.
    pub tls: Option<Tls>,
    /// Worker threads of the runtime; `None` means the number of cores.
    pub workers: Option<usize>,
    /// Runtime model: `auto` (one current-thread runtime when `workers = 1`, else
    /// `per_core`), `multi_thread` (one work-stealing runtime), `current_thread`, or
    /// `per_core` (one current-thread runtime per worker thread).
    pub runtime: RuntimeModel,
    /// Accept HTTP/2 with prior knowledge (h2c) on plain listeners.
    pub h2c: bool,
    /// Bind listeners with `SO_REUSEPORT`, so that several processes can listen on
    /// the same address (the kernel spreads new connections among them).
    pub reuse_port: bool,
    /// Networks whose `X-Forwarded-*` and `x-request-id` headers are trusted.
    pub trusted_proxies: Vec<String>,
    /// Listeners (entries of `listen` or `tls.listen`) whose connections start with a
    /// PROXY protocol header (v1 or v2) from a trusted proxy.
    pub proxy_protocol: Vec<String>,
    /// Add a `Via` header to requests and responses.
    pub via: bool,
    /// Time allowed to read a client's HTTP/1 request head; it also bounds how long
    /// an idle keep-alive connection waits for its next request.
    pub header_read_timeout: Duration,
    /// Longest wait for the next chunk of a client's request body (over it: 408).
    pub client_body_timeout: Duration,
    /// Directory for state that outlives the process (recommendations, decisions,
    /// audit log). Without one, that state is kept in memory only.
    pub data_dir: Option<String>,
    /// How long graceful shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Maximum open client connections across all listeners; past it, new
    /// connections wait in the kernel's accept backlog until one closes.
    pub max_connections: usize,
    pub limits: Limits,
    /// How request paths are normalised before routing, inspection and forwarding.
    pub normalize: Normalize,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: Vec::new(),
            tls: None,
            workers: None,
            runtime: RuntimeModel::Auto,
            h2c: false,
            reuse_port: false,
            trusted_proxies: Vec::new(),
            proxy_protocol: Vec::new(),
            via: true,
            header_read_timeout: Duration::from_secs(30),
            client_body_timeout: Duration::from_secs(60),
            data_dir: None,
            shutdown_timeout: Duration::from_secs(30),
            max_connections: 65_536,
            limits: Limits::default(),
            normalize: Normalize::default(),
        }
    }
}

/// `[server.normalize]`: one normalised view of the path for every stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Normalize {
    /// Merge runs of `/` into one.
    pub merge_slashes: bool,
    /// What to do with `%2F` and `%5C` (and a raw `\`) in a path.
    pub encoded_slash: EncodedSlash,
    /// What to do with `%25XX` (double encoding) in a path.
    pub double_encoding: DoubleEncoding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlash {
    /// Forwarded encoded; not a separator for routing.
    #[default]
    Keep,
    /// 400 `BAD_PATH`.
    Reject,
    /// Decoded to `/` before routing, inspection and forwarding.
    Decode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DoubleEncoding {
    /// 400 `BAD_PATH`.
    #[default]
    Reject,
    /// Decoded (at most three rounds) and then normalised as usual.
    Decode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeModel {
    #[default]
    Auto,
    MultiThread,
    CurrentThread,
    /// One current-thread runtime per worker thread, each with its own
    /// `SO_REUSEPORT` listening sockets.
    PerCore,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Total size of the request head's header fields (over it: 431).
    pub max_header_size: Size,
    /// Number of request header fields (over it: 431).
    pub max_headers: usize,
    /// Length of the request target (over it: 414).
    pub max_uri_length: Size,
    /// Size of a request body (over it: 413).
    pub max_request_body: Size,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_size: Size::kib(32),
            max_headers: 100,
            max_uri_length: Size::kib(8),
            max_request_body: Size::mib(16),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub listen: Vec<String>,
    /// Offer HTTP/2 via ALPN.
    #[serde(default = "yes")]
    pub http2: bool,
    pub certificates: Vec<Certificate>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// PEM file with the certificate chain.
    pub cert: String,
    /// PEM file with the private key.
    pub key: String,
}

/// The HTTP cache's storage (shared by every route that caches).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Memory tier size.
    pub memory_size: Size,
    /// Larger responses are passed through and not stored.
    pub max_object_size: Size,
    /// Upper bound of heuristic freshness.
    pub heuristic_max: Duration,
    /// Response header whose values tag an object for purge by tag
    /// (comma- or space-separated, as `Cache-Tag` and `Surrogate-Key` are).
    pub tag_header: String,
    /// Directory of the disk tier (relative to the config file); absent: memory only.
    pub disk_dir: Option<String>,
    /// Size of the disk tier.
    pub disk_size: Size,
    /// Networks allowed to send `PURGE` requests on the public listeners. Empty (the
    /// default): the edge does not handle `PURGE`, which is proxied like any method.
    pub purge_allow: Vec<String>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            memory_size: Size::mib(256),
            max_object_size: Size::mib(8),
            heuristic_max: Duration::from_secs(86_400),
            tag_header: "cache-tag".into(),
            purge_allow: Vec::new(),
            disk_dir: None,
            disk_size: Size::mib(1024),
        }
    }
}

/// Caching on a route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteCache {
    pub enabled: bool,
    /// Store responses that set cookies (the cookies are never stored or replayed).
    pub allow_set_cookie: bool,
    /// Serve a stale response this long past its freshness when the origin fails
    /// (RFC 5861 `stale-if-error`; a response's own directive takes precedence).
    pub stale_if_error: Duration,
    /// Serve a stale response this long past its freshness while one background
    /// request refreshes it (RFC 5861 `stale-while-revalidate`).
    pub stale_while_revalidate: Duration,
    /// Longest a request waits for a concurrent fetch of the same URL (coalescing)
    /// before going to the origin itself.
    pub coalesce_timeout: Duration,
    /// Sort query parameters in the key, so `?b=2&a=1` and `?a=1&b=2` share an entry.
    pub sort_query: bool,
    /// Query parameters left out of the key (e.g. `utm_source`).
    pub ignore_query: Vec<String>,
    /// When set, only these query parameters are part of the key.
    pub query_allow: Option<Vec<String>>,
    /// Request headers whose values are part of the key.
    pub key_headers: Vec<String>,
    /// Cookies whose values are part of the key.
    pub key_cookies: Vec<String>,
    /// Freshness to use for every stored response instead of the origin's.
    pub ttl: Option<Duration>,
    /// Lower and upper bounds on freshness.
    pub min_ttl: Option<Duration>,
    pub max_ttl: Option<Duration>,
    /// Requests carrying any of these cookies or headers bypass the cache.
    pub bypass_cookies: Vec<String>,
    pub bypass_headers: Vec<String>,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache {
            enabled: true,
            allow_set_cookie: false,
            stale_if_error: Duration::from_secs(0),
            stale_while_revalidate: Duration::from_secs(0),
            coalesce_timeout: Duration::from_secs(5),
            sort_query: false,
            ignore_query: Vec::new(),
            query_allow: None,
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            ttl: None,
            min_ttl: None,
            max_ttl: None,
            bypass_cookies: Vec::new(),
            bypass_headers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: String,
    /// `env:NAME`, `file:PATH` or a literal token (warned about): a write-scoped
    /// token named `admin`.
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// Named tokens with a scope.
    #[serde(default)]
    pub tokens: Vec<AdminToken>,
    /// Networks allowed to read `/metrics` (empty: anyone who reaches the listener).
    #[serde(default)]
    pub metrics_allow: Vec<String>,
    /// Failed authentications from one client IP before it is locked out.
    #[serde(default = "default_auth_failures")]
    pub max_auth_failures: u32,
    /// How long a lockout lasts (and the window failures are counted in).
    #[serde(default = "default_auth_lockout")]
    pub auth_lockout: Duration,
}

fn default_auth_failures() -> u32 {
    5
}

fn default_auth_lockout() -> Duration {
    Duration::from_secs(60)
}

/// `[[admin.tokens]]`: a bearer token with a name (in the audit log) and a scope.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    pub name: String,
    /// `env:NAME`, `file:PATH` or a literal (warned about).
    #[serde(skip_serializing)]
    pub token: String,
    pub scope: TokenScope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    /// GET endpoints only.
    Read,
    /// Everything.
    Write,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `"stdout"`, `"off"`, or a file path for the JSON access log.
    pub access: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            access: "stdout".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    LeastRequest,
    ConsistentHash,
}

/// Where a consistent-hash key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Path,
    Header(String),
    Cookie(String),
    Query(String),
}

impl std::str::FromStr for HashKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: use \"ip\", \"path\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\"");
        match s.split_once(':') {
            None if s == "ip" => Ok(HashKey::ClientIp),
            None if s == "path" => Ok(HashKey::Path),
            Some((kind, name)) if !name.trim().is_empty() => match kind {
                "header" => http::HeaderName::from_bytes(name.trim().as_bytes())
                    .map(|h| HashKey::Header(h.as_str().to_string()))
                    .map_err(|_| format!("`{name}` is not a valid header name")),
                "cookie" => Ok(HashKey::Cookie(name.trim().to_string())),
                "query" => Ok(HashKey::Query(name.trim().to_string())),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Backend>,
    /// Protocol spoken to the backends.
    #[serde(default)]
    pub protocol: Protocol,
    /// Load-balancing algorithm.
    #[serde(default)]
    pub balance: Balance,
    /// Key for `consistent_hash`: `ip`, `path`, `header:NAME`, `cookie:NAME` or `query:NAME`.
    #[serde(default)]
    pub hash_key: Option<String>,
    /// Active health checks; absent means none.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Passive health checks (outlier detection / circuit breaker).
    #[serde(default)]
    pub outlier: Outlier,
    /// Retries of failed attempts.
    #[serde(default)]
    pub retry: Retry,
    /// Session affinity: keep a client on the backend that served it.
    #[serde(default)]
    pub affinity: Option<Affinity>,
    /// Pool used when this one has no healthy backend (instead of panic mode).
    #[serde(default)]
    pub fallback: Option<String>,
    /// Ramp a recovered backend's weight from 10% to 100% over this time (0: off).
    #[serde(default)]
    pub slow_start: Duration,
    /// When the healthy share of the pool's weight falls below this fraction, balance
    /// across every enabled backend regardless of health (panic mode).
    #[serde(default = "default_panic")]
    pub panic_threshold: f64,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub tls: UpstreamTls,
    /// Idle keep-alive connections kept per backend.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_backend: usize,
    /// How long an idle upstream connection is kept.
    #[serde(default = "default_pool_idle")]
    pub idle_timeout: Duration,
}

fn default_panic() -> f64 {
    0.5
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    #[default]
    Http,
    Tcp,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// Path to request, or `"auto"`: try /health, /healthz, /status, /ping and keep
    /// the first that answers 2xx.
    pub path: String,
    pub method: String,
    /// Host header for the check (default: the backend's host:port).
    pub host: Option<String>,
    /// Statuses that pass: codes and ranges, e.g. `"200-399"` or `"200,204"`.
    pub expect: String,
    pub interval: Duration,
    /// Up to this much is added to each interval at random, so checks spread out.
    pub jitter: Duration,
    pub timeout: Duration,
    pub consecutive_up: u32,
    pub consecutive_down: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: HealthKind::Http,
            path: "/".into(),
            method: "GET".into(),
            host: None,
            expect: "200-399".into(),
            interval: Duration::from_secs(5),
            jitter: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
            consecutive_up: 2,
            consecutive_down: 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    pub enabled: bool,
    /// Eject after this many failures in a row (0: off).
    pub consecutive_failures: u32,
    /// Eject when failures reach this fraction of requests in the window (absent: off).
    pub error_rate: Option<f64>,
    pub window: Duration,
    /// The error rate counts only with at least this many requests in the window.
    pub min_requests: u32,
    /// First ejection time; doubles for each ejection in a row, up to `max_ejection_time`.
    pub ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// Successful trial requests that close a half-open circuit.
    pub success_threshold: u32,
    /// Trial requests in flight at once while half-open.
    pub half_open_requests: usize,
    /// Never eject more than this share of the pool's backends, in percent.
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            enabled: true,
            consecutive_failures: 5,
            error_rate: None,
            window: Duration::from_secs(30),
            min_requests: 20,
            ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            success_threshold: 2,
            half_open_requests: 1,
            max_ejected_percent: 50,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AffinityMode {
    #[default]
    Cookie,
    Header,
    Ip,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Affinity {
    pub mode: AffinityMode,
    /// Cookie carrying the signed, opaque session pin (`cookie` mode).
    pub cookie: String,
    /// Request header whose value keys the session (`header` mode).
    pub header: String,
    /// Lifetime of the cookie (Max-Age).
    pub ttl: Duration,
    pub path: String,
    pub secure: bool,
    pub http_only: bool,
    /// `Lax`, `Strict` or `None`.
    pub same_site: String,
    /// HMAC key for cookies: `env:NAME`, `file:PATH` or a literal. Without one, a
    /// random key is made at start (cookies then do not survive a restart).
    #[serde(skip_serializing)]
    pub key: Option<String>,
}

impl Default for Affinity {
    fn default() -> Self {
        Affinity {
            mode: AffinityMode::Cookie,
            cookie: "rampart_affinity".into(),
            header: "x-session-id".into(),
            ttl: Duration::from_secs(3600),
            path: "/".into(),
            secure: false,
            http_only: true,
            same_site: "Lax".into(),
            key: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// Retries after the first attempt (0: never retry).
    pub retries: u32,
    /// When to retry: `connect_failure` (refused, connect timeout, DNS, TLS), `reset`
    /// (connection closed or reset, invalid response), `timeout` (no response head in
    /// time), or a status code such as `"503"`.
    pub on: Vec<String>,
    /// Time allowed to each attempt for its response head (default: `timeouts.response_header`).
    pub per_try_timeout: Option<Duration>,
    /// A request body is kept for replay up to this size; a longer one is not retried.
    pub replay_limit: Size,
    /// Retries may add at most this percentage of the pool's requests (over 10 s)...
    pub budget_percent: u32,
    /// ...plus this many retries per second.
    pub budget_min_per_second: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            retries: 1,
            on: vec!["connect_failure".into(), "reset".into(), "timeout".into()],
            per_try_timeout: None,
            replay_limit: Size::kib(64),
            budget_percent: 20,
            budget_min_per_second: 10,
        }
    }
}

fn default_max_idle() -> usize {
    64
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(90)
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// From sending the request to receiving the response head.
    pub response_header: Duration,
    /// Between two chunks of a response body.
    pub body_idle: Duration,
    /// Whole exchange including the response body; `"0"` disables it.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            response_header: Duration::from_secs(60),
            body_idle: Duration::from_secs(60),
            request: Duration::from_secs(0),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTls {
    /// PEM file of CA certificates to verify backends against (default: system roots).
    pub ca: Option<String>,
    /// Server name sent in SNI and verified (default: the backend URL's host).
    pub sni: Option<String>,
    /// Skip certificate verification. For labs only.
    pub insecure: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backend {
    pub url: String,
    pub weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTable {
    url: String,
    #[serde(default = "one")]
    weight: u32,
}
fn one() -> u32 {
    1
}

impl<'de> Deserialize<'de> for Backend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Backend;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a backend URL string or a table { url = \"...\", weight = N }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Backend, E> {
                Ok(Backend {
                    url: v.to_owned(),
                    weight: 1,
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Backend, A::Error> {
                let t = BackendTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Backend {
                    url: t.url,
                    weight: t.weight,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// A name for logs and metrics (default: the first host).
    #[serde(default)]
    pub name: Option<String>,
    /// Exact host names and `*.suffix` wildcards.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Serve requests whose host matches no site.
    #[serde(default)]
    pub default: bool,
    /// Redirect plain-HTTP requests to HTTPS with 308.
    #[serde(default)]
    pub https_redirect: bool,
    /// Port used in the redirect's `Location` (default 443).
    #[serde(default)]
    pub https_port: Option<u16>,
    /// Add `x-rampart-*` explanation headers to responses.
    #[serde(default)]
    pub explain: bool,
    /// Access rules for every request to this site (checked before the route's).
    #[serde(default)]
    pub access: Option<Access>,
    /// Rate-limit rules (by name) for every request to this site.
    #[serde(default)]
    pub rate_limits: Vec<String>,
    #[serde(default)]
    pub route: Vec<Route>,
}

/// `access`: who may use a site or route, by client IP and request headers.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Access {
    /// When not empty, only clients in these networks (IPs or CIDRs).
    pub allow_ips: Vec<String>,
    /// Clients in these networks are refused (before `allow_ips`).
    pub deny_ips: Vec<String>,
    /// A request carrying a matching header is refused.
    pub deny_headers: Vec<HeaderRule>,
    /// A request must carry a matching header for each of these.
    pub require_headers: Vec<HeaderRule>,
    /// Request headers removed before anything later sees them or they go upstream.
    pub strip_headers: Vec<String>,
}

/// A header test: present (no `matches`), or some value matching the regex.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRule {
    pub name: String,
    #[serde(default)]
    pub matches: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Prefix match; the longest matching prefix wins.
    #[serde(default)]
    pub path: Option<String>,
    /// Exact match on the path.
    #[serde(default)]
    pub exact: Option<String>,
    /// Glob match on the path (`*` within a segment, `**` across segments).
    #[serde(default)]
    pub glob: Option<String>,
    /// The pool that serves this route (or set `chain`).
    #[serde(default)]
    pub pool: Option<String>,
    /// The provider chain that serves this route (or set `pool`).
    #[serde(default)]
    pub chain: Option<String>,
    /// Remove the matched prefix before forwarding (prefix routes only).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the matched prefix with this before forwarding (prefix routes only).
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    /// `"preserve"` (default), `"backend"` (the backend's host:port), or a literal host.
    #[serde(default = "preserve")]
    pub host_header: String,
    /// HTTP caching on this route (pool routes).
    #[serde(default)]
    pub cache: Option<RouteCache>,
    /// Allow retries of non-idempotent methods (POST, PATCH) on this route.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Tunnel WebSocket and other HTTP/1.1 upgrades.
    #[serde(default = "yes")]
    pub websocket: bool,
    /// Idle timeout of an upgraded (tunnelled) connection.
    #[serde(default = "default_tunnel_idle")]
    pub tunnel_idle_timeout: Duration,
    /// Access rules for this route (after the site's).
    #[serde(default)]
    pub access: Option<Access>,
    /// Rate-limit rules (by name) for this route, after the site's.
    #[serde(default)]
    pub rate_limits: Vec<String>,
}

fn preserve() -> String {
    "preserve".into()
}
fn default_tunnel_idle() -> Duration {
    Duration::from_secs(300)
}
