//! Admin listener: `/healthz`, `/readyz`, `/metrics`, and the `/admin/` API
//! (status, config with secrets redacted, reload). Everything under `/admin/`
//! needs the bearer token when one is configured; with none configured, the
//! read-only endpoints answer and the mutating ones are refused.

use crate::Shared;
use axum::Extension;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rampart_config::TokenScope;
use serde_json::json;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;

pub fn router(shared: Arc<Shared>) -> Router {
    let admin = Router::new()
        .route("/admin/status", get(status))
        .route("/admin/config", get(config))
        .route("/admin/reload", post(reload))
        .route("/admin/pools", get(pools))
        .route("/admin/traces", get(traces))
        .route("/admin/analyze", post(analyze))
        .route("/admin/recommendations", get(recommendations))
        .route("/admin/recommendations/{id}/{decision}", post(decide))
        .route("/admin/audit", get(audit))
        .route("/admin/cache/stats", get(cache_stats))
        .route("/admin/cache/purge", post(cache_purge))
        .route("/admin/chains", get(chains))
        .route("/admin/pools/{pool}/backends/{backend}/{action}", post(backend_action))
        .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(admin)
        .with_state(shared)
}

/// Who called, once authenticated: the token's name (for the audit log) and scope.
#[derive(Clone)]
pub struct Caller {
    pub name: Arc<str>,
}

/// Failed authentications per client IP. After `admin.max_auth_failures` within
/// `admin.auth_lockout`, the IP is refused (429) until the lockout has passed, even
/// with a valid token. At most `MAX_TRACKED` IPs are tracked.
#[derive(Default)]
pub struct AuthThrottle {
    failures: Mutex<HashMap<IpAddr, (u32, std::time::Instant)>>,
}

const MAX_TRACKED: usize = 10_000;

impl AuthThrottle {
    /// How long `ip` stays locked out, if it is.
    fn locked(&self, ip: IpAddr, max: u32, window: Duration) -> Option<Duration> {
        let m = self.failures.lock().ok()?;
        let (count, since) = m.get(&ip)?;
        let elapsed = since.elapsed();
        (*count >= max && elapsed < window).then(|| window - elapsed)
    }

    fn fail(&self, ip: IpAddr, max: u32, window: Duration) {
        let Ok(mut m) = self.failures.lock() else { return };
        if m.len() >= MAX_TRACKED && !m.contains_key(&ip) {
            m.retain(|_, (_, since)| since.elapsed() < window);
            if m.len() >= MAX_TRACKED {
                return;
            }
        }
        let e = m.entry(ip).or_insert((0, std::time::Instant::now()));
        if e.1.elapsed() >= window {
            *e = (0, std::time::Instant::now());
        }
        e.0 += 1;
        if e.0 == max {
            // The lockout runs from the last failure.
            e.1 = std::time::Instant::now();
        }
    }

    fn succeed(&self, ip: IpAddr) {
        if let Ok(mut m) = self.failures.lock() {
            m.remove(&ip);
        }
    }
}

fn refusal(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

async fn auth(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    let snap = shared.snapshot.load();
    let mutating =
        !(req.method() == Method::GET || req.method() == Method::HEAD || req.uri().path() == "/admin/analyze");
    let tokens = &snap.validated.admin_tokens;
    if tokens.is_empty() {
        // Reading, and analysing a trace (which changes nothing), is open without a token.
        if !mutating {
            return next.run(req).await;
        }
        return refusal(
            StatusCode::FORBIDDEN,
            "no admin token is configured (admin.token or admin.tokens), so mutating endpoints are disabled".into(),
        );
    }
    let admin = snap.validated.config.admin.as_ref();
    let max = admin.map_or(5, |a| a.max_auth_failures);
    let window = admin.map_or(Duration::from_secs(60), |a| a.auth_lockout.get());
    let ip = peer.ip();
    if let Some(left) = shared.admin_throttle.locked(ip, max, window) {
        let mut r = refusal(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed authentications from {ip}; try again later"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(left.as_secs().max(1)));
        return r;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare with every token, in constant time, without stopping at a match.
    let mut found = None;
    for t in tokens {
        if bool::from(given.as_bytes().ct_eq(t.1.as_bytes())) {
            found = Some(t);
        }
    }
    let Some((name, _, scope)) = found else {
        shared.admin_throttle.fail(ip, max, window);
        tracing::warn!(target: "rampart::audit", %ip, path = %req.uri().path(), "admin authentication failed");
        let mut r = refusal(StatusCode::UNAUTHORIZED, "a valid bearer token is required".into());
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"rampart\""),
        );
        return r;
    };
    shared.admin_throttle.succeed(ip);
    if mutating && *scope == TokenScope::Read {
        return refusal(
            StatusCode::FORBIDDEN,
            format!("token \"{name}\" has the read scope; {} needs write", req.uri().path()),
        );
    }
    req.extensions_mut().insert(Caller {
        name: Arc::from(name.as_str()),
    });
    next.run(req).await
}

/// The caller's token name, for the audit log.
fn operator(caller: Option<&Extension<Caller>>) -> String {
    caller.map_or_else(|| "admin-api".to_string(), |c| c.name.to_string())
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    let allow = &shared.snapshot.load().validated.metrics_allow;
    if !allow.is_empty() && !allow.iter().any(|c| c.contains(peer.ip())) {
        return refusal(
            StatusCode::FORBIDDEN,
            format!("{} is not in admin.metrics_allow", peer.ip()),
        );
    }
    shared.cache.refresh_gauges();
    let body = shared.metrics.encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let snap = shared.snapshot.load();
    let loaded = snap
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let listeners: Vec<serde_json::Value> = shared
        .listener_list()
        .into_iter()
        .map(|(spec, kind, addr)| json!({"listen": spec, "kind": kind, "address": addr.to_string()}))
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "config": {
            "version": snap.version,
            "hash": snap.validated.hash,
            "loaded_at_unix": loaded,
            "warnings": snap.validated.warnings,
        },
        "listeners": listeners,
        "open_connections": shared.conns.active(),
        "ready": shared.ready.load(Ordering::SeqCst),
    }))
}

async fn config(State(shared): State<Arc<Shared>>) -> Response {
    let snap = shared.snapshot.load();
    let mut v = serde_json::to_value(&snap.validated.config).unwrap_or_default();
    if let Some(admin) = v.get_mut("admin").and_then(|a| a.as_object_mut())
        && snap.validated.admin_token.is_some()
    {
        admin.insert("token".into(), json!("<redacted>"));
    }
    // Token secrets are never serialised; say that they exist.
    if let Some(list) = v
        .get_mut("admin")
        .and_then(|a| a.get_mut("tokens"))
        .and_then(|t| t.as_array_mut())
    {
        for t in list.iter_mut().filter_map(|t| t.as_object_mut()) {
            t.insert("token".into(), json!("<redacted>"));
        }
    }
    Json(v).into_response()
}

async fn reload(State(shared): State<Arc<Shared>>, caller: Option<Extension<Caller>>) -> Response {
    let who = operator(caller.as_ref());
    match shared.reload().await {
        Ok(r) => {
            shared.control.record_audit(
                &who,
                "config-reload",
                &format!("version {} hash {}", r.version, r.hash),
                None,
            );
            (
                StatusCode::OK,
                Json(json!({"ok": true, "version": r.version, "hash": r.hash, "warnings": r.warnings})),
            )
                .into_response()
        }
        Err(errors) => {
            let n = errors.messages().len();
            shared
                .control
                .record_audit(&who, "config-reload-refused", "config", Some(format!("{n} error(s)")));
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"ok": false, "errors": errors.messages()})),
            )
                .into_response()
        }
    }
}

async fn pools(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let snap = shared.snapshot.load();
    let mut names: Vec<&String> = snap.pools.keys().collect();
    names.sort();
    let pools: Vec<serde_json::Value> = names
        .into_iter()
        .filter_map(|n| snap.pools.get(n))
        .map(|p| {
            let backends: Vec<serde_json::Value> = p
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    json!({
                        "index": i,
                        "url": &*b.label,
                        "weight": b.weight,
                        "state": b.state.admin().as_str(),
                        "healthy": b.state.considered_healthy(),
                        "active_check": if p.health.is_none() { "none" } else if b.state.active_healthy() { "passing" } else { "failing" },
                        "circuit": b.state.circuit_name(),
                        "in_flight": b.state.in_flight(),
                    })
                })
                .collect();
            json!({"name": &*p.name, "balance": p.balance_name(), "panic": p.in_panic(), "backends": backends})
        })
        .collect();
    Json(json!({ "pools": pools }))
}

/// `POST /admin/pools/{pool}/backends/{backend}/{drain|disable|enable}`. The backend is
/// named by its index in the pool, its URL, or its `host:port`. Takes effect at once,
/// without a reload, and lasts until changed again (a reload keeps it).
async fn backend_action(
    State(shared): State<Arc<Shared>>,
    caller: Option<Extension<Caller>>,
    Path((pool, backend, action)): Path<(String, String, String)>,
) -> Response {
    let state = match action.as_str() {
        "drain" => crate::balance::AdminState::Draining,
        "disable" => crate::balance::AdminState::Disabled,
        "enable" => crate::balance::AdminState::Enabled,
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": format!("unknown action `{action}`: use drain, disable or enable")})),
            )
                .into_response();
        }
    };
    let snap = shared.snapshot.load();
    let Some(p) = snap.pools.get(&pool) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no pool named \"{pool}\"")})),
        )
            .into_response();
    };
    let found = p
        .backends
        .iter()
        .enumerate()
        .find(|(i, b)| backend == i.to_string() || backend == *b.label || backend == b.authority.as_str());
    let Some((i, b)) = found else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("pool \"{pool}\" has no backend `{backend}` (use its index, URL or host:port)")})),
        )
            .into_response();
    };
    let before = b.state.admin();
    b.state.set_admin(state);
    shared.control.record_audit(
        &operator(caller.as_ref()),
        &format!("backend-{action}"),
        &format!("pool {pool} backend {}", b.label),
        None,
    );
    tracing::info!(
        target: "rampart::audit",
        pool = %pool,
        backend = %b.label,
        from = before.as_str(),
        to = state.as_str(),
        "backend state changed via admin API"
    );
    Json(json!({
        "pool": pool,
        "index": i,
        "url": &*b.label,
        "state": state.as_str(),
        "previous": before.as_str(),
        "in_flight": b.state.in_flight(),
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct TraceQuery {
    route: Option<String>,
    provider: Option<String>,
    limit: Option<usize>,
}

/// `GET /admin/traces?route=/videos/&provider=cdn-a&limit=50`: the newest route traces
/// (at most 1000 are kept), filtered by route key and by a provider that was tried.
async fn traces(State(shared): State<Arc<Shared>>, Query(q): Query<TraceQuery>) -> Json<serde_json::Value> {
    let limit = q.limit.unwrap_or(100).min(1000);
    let t = shared.traces.query(q.route.as_deref(), q.provider.as_deref(), limit);
    Json(json!({ "traces": t }))
}

/// `GET /admin/chains`: provider health per chain, provider and scope.
async fn chains(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({ "health": shared.chain_health.report() }))
}

/// `POST /admin/analyze`: a report on one route trace, given as the JSON that
/// `/admin/traces` returns, or as `{"trace": "<x-rampart-route-trace value>"}`.
async fn analyze(body: axum::body::Bytes) -> Response {
    let parsed: Result<serde_json::Value, String> =
        serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| format!("the body is not JSON: {e}"));
    let trace = parsed.and_then(|v| match v.get("trace").and_then(|t| t.as_str()) {
        Some(encoded) => crate::chain::unbase64url(encoded)
            .ok_or_else(|| "`trace` is not base64url".to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("`trace` does not decode to JSON: {e}"))),
        None => Ok(v),
    });
    match trace.and_then(|t| crate::analyser::analyze(&t)) {
        Ok(report) => Json(report).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    }
}

async fn recommendations(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({ "recommendations": shared.control.recommendations() }))
}

#[derive(serde::Deserialize, Default)]
struct Decision {
    operator: Option<String>,
    note: Option<String>,
}

/// `POST /admin/recommendations/{id}/{approve|reject}` with `{"operator": "...", "note": "..."}`.
async fn decide(
    State(shared): State<Arc<Shared>>,
    Path((id, decision)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let approve = match decision.as_str() {
        "approve" => true,
        "reject" => false,
        _ => {
            return (StatusCode::NOT_FOUND, Json(json!({"error": "use approve or reject"}))).into_response();
        }
    };
    let d: Decision = if body.is_empty() {
        Decision::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(d) => d,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": format!("the body is not valid JSON: {e}")})),
                )
                    .into_response();
            }
        }
    };
    // The body names the operator (required), as the person deciding.
    match shared
        .control
        .decide(&id, approve, d.operator.as_deref(), d.note, &shared.chain_health)
    {
        Ok(r) => Json(json!(r)).into_response(),
        Err((code, msg)) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
            Json(json!({"error": msg})),
        )
            .into_response(),
    }
}

async fn audit(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({ "audit": shared.control.audit() }))
}

async fn cache_stats(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let c = &shared.cache;
    c.refresh_gauges();
    let s = &c.stats;
    Json(json!({
        "memory": { "objects": c.objects(), "bytes": c.bytes(), "capacity_bytes": c.capacity },
        "disk": c.disk.as_ref().map(|d| json!({ "files": d.files(), "bytes": d.bytes(), "evicted": s.disk_evicted.get() })),
        "hits": s.hit.get(), "misses": s.miss.get(), "expired": s.expired.get(),
        "revalidated": s.revalidated.get(), "stale_served": s.stale.get(), "bypassed": s.bypass.get(),
        "stored": s.stored.get(), "evicted": s.evicted.get(),
    }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    url: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    soft: bool,
}

/// `POST /admin/cache/purge` with exactly one of `{"url": ...}` (every variant),
/// `{"prefix": ...}`, `{"tag": ...}` or `{"all": true}`, and optionally `"soft": true`
/// (mark stale so the next request revalidates; the default hard purge deletes).
async fn cache_purge(
    State(shared): State<Arc<Shared>>,
    caller: Option<Extension<Caller>>,
    body: axum::body::Bytes,
) -> Response {
    let req: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e.to_string()}))).into_response(),
    };
    // URLs and prefixes are given as http(s)://host/path; they are keyed like requests.
    let as_key = |u: &str| -> Option<String> {
        let uri: http::Uri = u.parse().ok()?;
        let tls = uri.scheme_str() == Some("https");
        let host = uri.host()?;
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        Some(crate::cache::key(tls, host, pq))
    };
    let what = match (req.url, req.prefix, req.tag, req.all) {
        (Some(u), None, None, false) => as_key(&u).map(crate::cache::Purge::Url),
        (None, Some(p), None, false) => as_key(&p).map(crate::cache::Purge::Prefix),
        (None, None, Some(t), false) if !t.is_empty() => Some(crate::cache::Purge::Tag(t)),
        (None, None, None, true) => Some(crate::cache::Purge::All),
        _ => None,
    };
    let Some(what) = what else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "give exactly one of url, prefix (absolute http(s) URLs), tag, or all: true"})),
        )
            .into_response();
    };
    let n = shared.cache.purge(&what, req.soft);
    let target = match &what {
        crate::cache::Purge::Url(k) => format!("url {k}"),
        crate::cache::Purge::Prefix(k) => format!("prefix {k}"),
        crate::cache::Purge::Tag(t) => format!("tag {t}"),
        crate::cache::Purge::All => "everything".into(),
    };
    shared.control.record_audit(
        &operator(caller.as_ref()),
        if req.soft { "cache-soft-purge" } else { "cache-purge" },
        &target,
        None,
    );
    Json(json!({"purged": n, "soft": req.soft})).into_response()
}
