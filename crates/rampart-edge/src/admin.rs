//! Admin listener: `/healthz`, `/readyz`, `/metrics`, and the `/admin/` API
//! (status, config with secrets redacted, reload). Everything under `/admin/`
//! needs the bearer token when one is configured; with none configured, the
//! read-only endpoints answer and the mutating ones are refused.

use crate::Shared;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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

async fn auth(State(shared): State<Arc<Shared>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let snap = shared.snapshot.load();
    match &snap.validated.admin_token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
                next.run(req).await
            } else {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": "a valid bearer token is required"})),
                )
                    .into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"rampart\""),
                );
                r
            }
        }
        // Reading, and analysing a trace (which changes nothing), is open without a token.
        None if req.method() == Method::GET || req.method() == Method::HEAD || req.uri().path() == "/admin/analyze" => {
            next.run(req).await
        }
        None => (
            StatusCode::FORBIDDEN,
            Json(json!({"error": "no admin token is configured (admin.token), so mutating endpoints are disabled"})),
        )
            .into_response(),
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
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
    Json(v).into_response()
}

async fn reload(State(shared): State<Arc<Shared>>) -> Response {
    match shared.reload().await {
        Ok(r) => (
            StatusCode::OK,
            Json(json!({"ok": true, "version": r.version, "hash": r.hash, "warnings": r.warnings})),
        )
            .into_response(),
        Err(errors) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"ok": false, "errors": errors.messages()})),
        )
            .into_response(),
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
        "admin-api",
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
async fn cache_purge(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
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
        "admin-api",
        if req.soft { "cache-soft-purge" } else { "cache-purge" },
        &target,
        None,
    );
    Json(json!({"purged": n, "soft": req.soft})).into_response()
}
