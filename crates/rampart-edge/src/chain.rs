//! Provider chains: failure-aware route control.
//!
//! A route may name a chain of providers (CDNs, mirrors, origins) instead of a pool.
//! Providers are tried in rank order; a timeout, a fetch error (refused, reset, TLS,
//! DNS, invalid response) or a status in `fail_on_status` records a failure point and
//! moves on to the next, which gets the same request (method, path, query, headers,
//! body up to the replay bound). When every provider fails, the origin fallback is
//! fetched if the policy allows it; otherwise the answer is 503 naming the policy.
//!
//! Health is kept in layers: per provider globally, per route scope (the directory of
//! the path, or the whole path), per chunk (the full path) and per session
//! (`x-rampart-session-id`). Failures in a row in the route, chunk or session scope put
//! the provider in cooldown there only: it is tried after the others for that scope,
//! while sibling routes keep their ranking. Latency is tracked as an EWMA.

use crate::body::UpstreamBody;
use crate::upstream::{ClientSettings, Clients, build_clients, classify};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use rampart_config::{Chain as ChainConfig, Protocol};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Provider {
    pub name: Arc<str>,
    /// Configured time to the response head.
    pub timeout: Duration,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    /// The URL's path, without a trailing slash ("" for none).
    base_path: String,
}

pub struct Chain {
    pub name: Arc<str>,
    adaptive: bool,
    half_life: Duration,
    pub recommend_after: u32,
    pub recommend_ttl: Duration,
    pub providers: Vec<Provider>,
    fail_on_status: Vec<u16>,
    origin: Option<Provider>,
    origin_allowed: bool,
    route_key_is_path: bool,
    cooldown_after: u32,
    cooldown: Duration,
    pub replay_limit: usize,
    /// One per worker runtime.
    client: Clients,
}

fn provider(name: &str, url: &str, timeout: Duration) -> Result<Provider, String> {
    let uri = rampart_config::check_provider_url(url)?;
    let authority = uri.authority().cloned().ok_or_else(|| format!("`{url}` has no host"))?;
    Ok(Provider {
        name: Arc::from(name),
        scheme: uri.scheme().cloned().unwrap_or(Scheme::HTTP),
        host: HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?,
        authority,
        base_path: uri.path().trim_end_matches('/').to_string(),
        timeout,
    })
}

impl Chain {
    /// `slots`: worker runtimes (the per-core model), each given its own client.
    pub fn build(cfg: &ChainConfig, base_dir: &Path, slots: usize) -> Result<Chain, String> {
        let providers = cfg
            .providers
            .iter()
            .map(|p| provider(&p.name, &p.url, p.timeout.unwrap_or(cfg.timeout).get()))
            .collect::<Result<Vec<_>, _>>()?;
        let origin = match &cfg.origin_fallback {
            Some(o) => Some(provider("origin", &o.url, cfg.timeout.get())?),
            None => None,
        };
        let (client, _) = build_clients(
            &ClientSettings {
                tls: &cfg.tls,
                connect: cfg.timeout.get(),
                protocol: Protocol::Http1,
                max_idle: 64,
                idle_timeout: Duration::from_secs(90),
            },
            base_dir,
            slots,
        )?;
        Ok(Chain {
            name: Arc::from(cfg.name.as_str()),
            adaptive: cfg.adaptive,
            half_life: cfg.penalty_half_life.get(),
            recommend_after: cfg.recommend_after,
            recommend_ttl: cfg.recommend_ttl.get(),
            providers,
            fail_on_status: cfg.fail_on_status.clone(),
            origin_allowed: cfg.origin_fallback.as_ref().is_some_and(|o| o.allowed),
            origin,
            route_key_is_path: cfg.route_key == "path",
            cooldown_after: cfg.cooldown_after,
            cooldown: cfg.cooldown.get(),
            replay_limit: cfg.replay_limit.as_usize(),
            client,
        })
    }

    /// The route scope of a path: its directory (`/videos/a/1.ts` → `/videos/a/`), or
    /// the whole path with `route_key = "path"`.
    pub fn route_key(&self, path: &str) -> String {
        if self.route_key_is_path {
            return path.to_string();
        }
        match path.rfind('/') {
            Some(i) => path[..=i].to_string(),
            None => "/".to_string(),
        }
    }
}

/// Scopes of provider health.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Scope {
    Global,
    Route(String),
    Chunk(String),
    Session(String),
}

#[derive(Debug)]
struct Stat {
    /// Recent failures, decaying: +1 per failure, halved per success and per half-life.
    penalty: f64,
    penalty_at: Instant,
    consecutive_failures: u32,
    cooldown_until: Option<Instant>,
    ewma_ms: f64,
    successes: u64,
    failures: u64,
    last_seen: Instant,
}

const MAX_SCOPES: usize = 10_000;

type StatKey = (Arc<str>, Arc<str>, Scope);
/// (chain, provider, route scope)
type DecisionKey = (String, String, String);

/// Provider health by (chain, provider, scope): kept across reloads, bounded.
#[derive(Default)]
pub struct HealthStore {
    stats: Mutex<HashMap<StatKey, Stat>>,
    /// Operator decisions for a route scope: (chain, provider, route) → (action, until).
    decisions: Mutex<HashMap<DecisionKey, (&'static str, Instant)>>,
    /// Operator timeout overrides: (chain, provider) → (timeout, until).
    timeouts: Mutex<HashMap<(String, String), (Duration, Instant)>>,
}

/// The health scopes a request belongs to.
struct Scopes<'a> {
    route: &'a str,
    path: &'a str,
    session: Option<&'a str>,
}

/// Why a provider was ranked where it was.
#[derive(Serialize, Clone, Debug)]
pub struct RankEntry {
    pub provider: String,
    /// `ok`; `penalty:N` (recent failures on this route scope); `cooldown:SCOPE:KEY`;
    /// or `operator:ACTION:route:KEY`.
    pub state: String,
    /// The decayed failure penalty on this route scope.
    pub penalty: f64,
    /// EWMA of its response-head latency on this route scope, if seen.
    pub ewma_ms: Option<f64>,
}

impl Stat {
    fn decayed_penalty(&self, now: Instant, half_life: Duration) -> f64 {
        let halves = now.saturating_duration_since(self.penalty_at).as_secs_f64() / half_life.as_secs_f64().max(1e-3);
        self.penalty * 0.5f64.powf(halves)
    }
}

/// A penalty at or above this demotes a provider behind cleaner ones: two recent
/// failures do (their sum has barely decayed), one does not.
const PENALTY_DEMOTES: f64 = 1.5;

impl HealthStore {
    fn scopes(w: &Scopes<'_>) -> Vec<Scope> {
        let mut v = vec![Scope::Route(w.route.to_string()), Scope::Chunk(w.path.to_string())];
        if let Some(s) = w.session {
            v.push(Scope::Session(s.to_string()));
        }
        v
    }

    /// Apply an approved decision until `until`: `"cooldown"` or `"demote"` (the
    /// provider is tried after the others on that route scope), or `"raise_timeout"`.
    pub fn apply(
        &self,
        action: &'static str,
        chain: &str,
        provider: &str,
        route: &str,
        until: Instant,
        timeout: Option<Duration>,
    ) {
        match (action, timeout) {
            ("raise_timeout", Some(t)) => {
                if let Ok(mut m) = self.timeouts.lock() {
                    m.insert((chain.to_string(), provider.to_string()), (t, until));
                }
            }
            _ => {
                if let Ok(mut m) = self.decisions.lock() {
                    m.insert(
                        (chain.to_string(), provider.to_string(), route.to_string()),
                        (action, until),
                    );
                }
            }
        }
    }

    /// The operator's timeout for a provider, while it lasts.
    fn timeout_for(&self, chain: &str, provider: &str) -> Option<Duration> {
        let now = Instant::now();
        let mut m = self.timeouts.lock().ok()?;
        m.retain(|_, (_, until)| *until > now);
        m.get(&(chain.to_string(), provider.to_string())).map(|(t, _)| *t)
    }

    /// Providers in the order to try them: those not cooling down in any of this
    /// request's scopes (nor set back by an operator decision for its route) by rank,
    /// then the others by rank.
    fn rank(&self, chain: &Chain, w: &Scopes<'_>) -> (Vec<usize>, Vec<RankEntry>) {
        let now = Instant::now();
        let scopes = Self::scopes(w);
        let decided: HashMap<String, &'static str> = match self.decisions.lock() {
            Ok(mut m) => {
                m.retain(|_, (_, until)| *until > now);
                m.iter()
                    .filter(|((c, _, r), _)| **c == *chain.name && r == w.route)
                    .map(|((_, p, _), (a, _))| (p.clone(), *a))
                    .collect()
            }
            Err(_) => HashMap::new(),
        };
        let stats = crate::lock(&self.stats);
        let mut keyed: Vec<(bool, u32, usize, RankEntry)> = chain
            .providers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let route_stat = stats.get(&(chain.name.clone(), p.name.clone(), Scope::Route(w.route.to_string())));
                let penalty = route_stat.map_or(0.0, |s| s.decayed_penalty(now, chain.half_life));
                let demoted = chain.adaptive && penalty >= PENALTY_DEMOTES;
                let cooling = scopes.iter().find(|sc| {
                    stats
                        .get(&(chain.name.clone(), p.name.clone(), (*sc).clone()))
                        .and_then(|s| s.cooldown_until)
                        .is_some_and(|until| until > now)
                });
                let operator = decided.get(&*p.name);
                let state = match (operator, cooling) {
                    (Some(action), _) => format!("operator:{action}:route:{}", w.route),
                    (None, cooling) => match cooling {
                        None if demoted => format!("penalty:{penalty:.1}"),
                        None => "ok".to_string(),
                        Some(Scope::Route(r)) => format!("cooldown:route:{r}"),
                        Some(Scope::Chunk(c)) => format!("cooldown:chunk:{c}"),
                        Some(Scope::Session(s)) => format!("cooldown:session:{s}"),
                        Some(Scope::Global) => "cooldown:global".to_string(),
                    },
                };
                (
                    cooling.is_some() || operator.is_some(),
                    u32::from(demoted),
                    i,
                    RankEntry {
                        provider: p.name.to_string(),
                        state,
                        penalty: (penalty * 100.0).round() / 100.0,
                        ewma_ms: route_stat.map(|s| (s.ewma_ms * 10.0).round() / 10.0),
                    },
                )
            })
            .collect();
        keyed.sort_by_key(|(cooling, demoted, i, _)| (*cooling, *demoted, *i));
        let order = keyed.iter().map(|(_, _, i, _)| *i).collect();
        let why = keyed.into_iter().map(|(_, _, _, r)| r).collect();
        (order, why)
    }

    fn record(&self, chain: &Chain, provider: &Arc<str>, w: &Scopes<'_>, ok: bool, took: Duration) {
        let now = Instant::now();
        let mut stats = crate::lock(&self.stats);
        if stats.len() >= MAX_SCOPES {
            // Forget scopes not seen for a while (and not cooling down) to stay bounded.
            let cutoff = chain.cooldown.max(Duration::from_secs(60));
            stats.retain(|_, s| {
                now.saturating_duration_since(s.last_seen) < cutoff || s.cooldown_until.is_some_and(|u| u > now)
            });
            if stats.len() >= MAX_SCOPES
                && let Some(oldest) = stats.iter().min_by_key(|(_, s)| s.last_seen).map(|(k, _)| k.clone())
            {
                stats.remove(&oldest);
            }
        }
        let mut all = Self::scopes(w);
        all.push(Scope::Global);
        for scope in all {
            let global = scope == Scope::Global;
            let s = stats
                .entry((chain.name.clone(), provider.clone(), scope))
                .or_insert(Stat {
                    penalty: 0.0,
                    penalty_at: now,
                    consecutive_failures: 0,
                    cooldown_until: None,
                    ewma_ms: took.as_secs_f64() * 1000.0,
                    successes: 0,
                    failures: 0,
                    last_seen: now,
                });
            s.last_seen = now;
            s.ewma_ms = 0.8 * s.ewma_ms + 0.2 * took.as_secs_f64() * 1000.0;
            let decayed = s.decayed_penalty(now, chain.half_life);
            s.penalty = if ok { decayed * 0.5 } else { decayed + 1.0 };
            s.penalty_at = now;
            if ok {
                s.successes += 1;
                s.consecutive_failures = 0;
                s.cooldown_until = None;
            } else {
                s.failures += 1;
                s.consecutive_failures += 1;
                // The global scope only observes: a failure on one route must not
                // demote the provider for its siblings.
                if !global && s.consecutive_failures >= chain.cooldown_after {
                    s.cooldown_until = Some(now + chain.cooldown);
                }
            }
        }
    }

    /// A snapshot for the admin API: per chain, provider and scope.
    pub fn report(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        let stats = crate::lock(&self.stats);
        let mut out: Vec<serde_json::Value> = stats
            .iter()
            .map(|((chain, provider, scope), s)| {
                let (kind, key) = match scope {
                    Scope::Global => ("global", String::new()),
                    Scope::Route(r) => ("route", r.clone()),
                    Scope::Chunk(c) => ("chunk", c.clone()),
                    Scope::Session(x) => ("session", x.clone()),
                };
                serde_json::json!({
                    "chain": &**chain, "provider": &**provider, "scope": kind, "key": key,
                    "successes": s.successes, "failures": s.failures,
                    "consecutive_failures": s.consecutive_failures,
                    "cooldown_seconds_left": s.cooldown_until.map_or(0, |u| u.saturating_duration_since(now).as_secs()),
                    "ewma_latency_ms": (s.ewma_ms * 10.0).round() / 10.0,
                })
            })
            .collect();
        out.sort_by_cached_key(|v| v.to_string());
        out
    }
}

/// How one provider attempt ended.
#[derive(Serialize, Clone, Debug)]
pub struct Attempt {
    pub provider: String,
    /// `PROVIDER_SUCCESS`, `PROVIDER_TIMEOUT`, `PROVIDER_FETCH_ERROR` or `PROVIDER_BLOCKED_<status>`.
    pub result: String,
    pub status: Option<u16>,
    pub duration_ms: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct FailurePoint {
    pub index: usize,
    /// `PROVIDER_TIMEOUT`, `PROVIDER_BLOCKED_STATUS` or `PROVIDER_FETCH_ERROR`.
    pub kind: &'static str,
    pub provider: String,
    pub result: String,
}

/// The explanation of a chain decision: headers, access log and trace store.
#[derive(Serialize, Clone, Debug)]
pub struct Trace {
    pub request_id: String,
    pub route_key: String,
    pub policy_id: String,
    pub rank: Vec<RankEntry>,
    pub attempts: Vec<Attempt>,
    pub failure_points: Vec<FailurePoint>,
    /// `none`, `origin` or `blocked_by_policy`.
    pub selected_fallback: &'static str,
    pub provider: Option<String>,
    pub reason: &'static str,
    pub final_status: u16,
}

impl Trace {
    /// `cdn-a:PROVIDER_TIMEOUT,cdn-b:PROVIDER_BLOCKED_429,cdn-c:PROVIDER_SUCCESS`
    pub fn attempts_header(&self) -> String {
        self.attempts
            .iter()
            .map(|a| format!("{}:{}", a.provider, a.result))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `1:PROVIDER_TIMEOUT:cdn-a:PROVIDER_TIMEOUT,...` or `none`.
    pub fn failure_points_header(&self) -> String {
        if self.failure_points.is_empty() {
            return "none".into();
        }
        self.failure_points
            .iter()
            .map(|f| format!("{}:{}:{}:{}", f.index, f.kind, f.provider, f.result))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The trace as URL-safe base64 of its JSON.
    pub fn encoded(&self) -> String {
        base64url(serde_json::to_string(self).unwrap_or_default().as_bytes())
    }
}

/// Decode base64url without padding (what `x-rampart-route-trace` carries).
pub fn unbase64url(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        })
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.trim_end_matches('=').as_bytes().chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

fn base64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        let chars = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for ch in chars.iter().take(c.len() + 1) {
            out.push(char::from(A[*ch as usize]));
        }
    }
    out
}

/// The request a chain forwards, shared by every attempt.
pub struct ChainRequest<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Prepared headers (hop-by-hop removed, forwarding headers set), without Host.
    pub headers: &'a HeaderMap,
    pub session: Option<&'a str>,
    pub request_id: &'a str,
    pub deadline: Option<tokio::time::Instant>,
}

pub struct ChainResult {
    pub response: Option<Response<Incoming>>,
    pub trace: Trace,
}

fn kind_of(result: &str) -> &'static str {
    if result == "PROVIDER_TIMEOUT" {
        "PROVIDER_TIMEOUT"
    } else if result.starts_with("PROVIDER_BLOCKED_") {
        "PROVIDER_BLOCKED_STATUS"
    } else {
        "PROVIDER_FETCH_ERROR"
    }
}

async fn attempt(
    chain: &Chain,
    store: &HealthStore,
    p: &Provider,
    req: &ChainRequest<'_>,
    body: UpstreamBody,
) -> (Result<Response<Incoming>, &'static str>, Duration) {
    let started = Instant::now();
    let pq = match req.query {
        Some(q) => format!("{}{}?{q}", p.base_path, req.path),
        None => format!("{}{}", p.base_path, req.path),
    };
    let uri = PathAndQuery::try_from(pq.as_str()).ok().and_then(|pq| {
        Uri::builder()
            .scheme(p.scheme.clone())
            .authority(p.authority.clone())
            .path_and_query(pq)
            .build()
            .ok()
    });
    let Some(uri) = uri else {
        return (Err("PROVIDER_FETCH_ERROR"), started.elapsed());
    };
    let mut r = Request::new(body);
    *r.method_mut() = req.method.clone();
    *r.uri_mut() = uri;
    *r.headers_mut() = req.headers.clone();
    r.headers_mut().insert(http::header::HOST, p.host.clone());
    *r.version_mut() = Version::HTTP_11;
    let timeout = store.timeout_for(&chain.name, &p.name).unwrap_or(p.timeout);
    let mut wait = tokio::time::Instant::now() + timeout;
    if let Some(d) = req.deadline {
        wait = wait.min(d);
    }
    let out = match tokio::time::timeout_at(wait, chain.client.get().request(r)).await {
        Err(_) => Err("PROVIDER_TIMEOUT"),
        Ok(Err(e)) => {
            tracing::debug!(provider = %p.name, error = ?e, reason = classify(&e).as_str(), "provider fetch failed");
            Err("PROVIDER_FETCH_ERROR")
        }
        Ok(Ok(resp)) => Ok(resp),
    };
    (out, started.elapsed())
}

/// Try the chain's providers in rank order, then the origin fallback if allowed.
/// `body` is replayable (`Empty`/`Full`), or streaming: then it can go to one
/// provider only, and there is no failover after it was sent.
pub async fn forward(chain: &Chain, store: &HealthStore, req: &ChainRequest<'_>, body: UpstreamBody) -> ChainResult {
    let route_key = chain.route_key(req.path);
    let scopes = Scopes {
        route: &route_key,
        path: req.path,
        session: req.session,
    };
    let (order, rank) = store.rank(chain, &scopes);
    let mut trace = Trace {
        request_id: req.request_id.to_string(),
        route_key: route_key.clone(),
        policy_id: chain.name.to_string(),
        rank,
        attempts: Vec::new(),
        failure_points: Vec::new(),
        selected_fallback: "none",
        provider: None,
        reason: "ALL_PROVIDERS_FAILED_FALLBACK_BLOCKED_BY_POLICY",
        final_status: 503,
    };
    let replay = match &body {
        UpstreamBody::Empty => Some(None),
        UpstreamBody::Full(b) => Some(b.clone()),
        UpstreamBody::Stream(_) => None,
    };
    let mut streaming = replay.is_none().then_some(body);
    for idx in order {
        let p = &chain.providers[idx];
        let body = match &replay {
            Some(b) => UpstreamBody::Full(b.clone()),
            None => match streaming.take() {
                Some(b) => b,
                // A streamed body went to the first provider; it cannot be sent again.
                None => break,
            },
        };
        let (out, took) = attempt(chain, store, p, req, body).await;
        let result = match &out {
            Ok(resp) if chain.fail_on_status.contains(&resp.status().as_u16()) => {
                format!("PROVIDER_BLOCKED_{}", resp.status().as_u16())
            }
            Ok(_) => "PROVIDER_SUCCESS".to_string(),
            Err(r) => (*r).to_string(),
        };
        let ok = result == "PROVIDER_SUCCESS";
        store.record(chain, &p.name, &scopes, ok, took);
        trace.attempts.push(Attempt {
            provider: p.name.to_string(),
            result: result.clone(),
            status: out.as_ref().ok().map(|r| r.status().as_u16()),
            duration_ms: (took.as_secs_f64() * 1e6).round() / 1e3,
        });
        if ok {
            let failed_before = &trace.failure_points;
            trace.reason = if failed_before.is_empty() {
                "PRIMARY_PROVIDER_SUCCESS"
            } else if failed_before.iter().all(|f| f.kind == "PROVIDER_TIMEOUT") {
                "PROVIDER_TIMEOUT_FAILOVER"
            } else if failed_before.iter().all(|f| f.kind == "PROVIDER_BLOCKED_STATUS") {
                "PROVIDER_BLOCKED_FAILOVER"
            } else {
                "PROVIDER_FAILOVER_SUCCESS"
            };
            trace.provider = Some(p.name.to_string());
            let resp = out.ok();
            trace.final_status = resp.as_ref().map_or(502, |r| r.status().as_u16());
            return ChainResult { response: resp, trace };
        }
        trace.failure_points.push(FailurePoint {
            index: trace.failure_points.len() + 1,
            kind: kind_of(&result),
            provider: p.name.to_string(),
            result,
        });
        if req.deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
    }
    // Every provider failed.
    if let (Some(origin), true) = (&chain.origin, chain.origin_allowed) {
        let body = match &replay {
            Some(b) => Some(UpstreamBody::Full(b.clone())),
            None => streaming.take(),
        };
        if let Some(body) = body {
            trace.selected_fallback = "origin";
            trace.reason = "ALL_PROVIDERS_FAILED_ORIGIN_FALLBACK_SELECTED";
            let (out, took) = attempt(chain, store, origin, req, body).await;
            let result = match &out {
                Ok(_) => "PROVIDER_SUCCESS".to_string(),
                Err(r) => (*r).to_string(),
            };
            trace.attempts.push(Attempt {
                provider: "origin".into(),
                result,
                status: out.as_ref().ok().map(|r| r.status().as_u16()),
                duration_ms: (took.as_secs_f64() * 1e6).round() / 1e3,
            });
            if let Ok(resp) = out {
                trace.provider = Some("origin".into());
                trace.final_status = resp.status().as_u16();
                return ChainResult {
                    response: Some(resp),
                    trace,
                };
            }
            trace.final_status = 502;
            return ChainResult { response: None, trace };
        }
    }
    trace.selected_fallback = "blocked_by_policy";
    ChainResult { response: None, trace }
}

/// The last route traces, bounded, for `GET /admin/traces`.
pub struct TraceStore {
    traces: Mutex<std::collections::VecDeque<Trace>>,
    cap: usize,
}

impl Default for TraceStore {
    fn default() -> Self {
        TraceStore {
            traces: Mutex::new(std::collections::VecDeque::new()),
            cap: 1000,
        }
    }
}

impl TraceStore {
    pub fn push(&self, t: Trace) {
        let mut q = crate::lock(&self.traces);
        if q.len() >= self.cap {
            q.pop_front();
        }
        q.push_back(t);
    }

    /// Newest first, filtered by route key and/or provider (any attempt).
    pub fn query(&self, route: Option<&str>, provider: Option<&str>, limit: usize) -> Vec<Trace> {
        let q = crate::lock(&self.traces);
        q.iter()
            .rev()
            .filter(|t| route.is_none_or(|r| t.route_key == r))
            .filter(|t| provider.is_none_or(|p| t.attempts.iter().any(|a| a.provider == p)))
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc4648() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        for s in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0xfb, 0xff, 0x00, 0x01],
        ] {
            assert_eq!(unbase64url(&base64url(s)).as_deref(), Some(s));
        }
        assert_eq!(unbase64url("a"), None);
        assert_eq!(unbase64url("a*bc"), None);
    }
}
