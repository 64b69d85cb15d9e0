//! The HTTP cache stage of the pipeline: [`before`] answers from a stored response or
//! prepares the origin request (validators, coalescing, background refresh), and
//! [`after`] handles the origin's answer (304 refresh, stale-if-error, storing).
//! Pool routes and provider chains both go through it.

use super::{Rec, X_REQUEST_ID, headers, local_response};
use crate::Shared;
use crate::body::UpBody;
use crate::body::{EdgeBody, UpstreamBody};
use crate::reason::Reason;
use crate::snapshot::Snapshot;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The request as the cache stage sees it (the same for pool and chain routes).
pub(super) struct View<'a> {
    pub shared: &'a Arc<Shared>,
    pub snap: &'a Snapshot,
    pub tls: bool,
    pub host: &'a HeaderValue,
    /// The normalised path and the query, for the key.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
}

/// A lookup: the request, and where its origin requests go.
pub(super) struct Lookup<'a> {
    pub view: &'a View<'a>,
    /// The path and query sent upstream (for a background refresh).
    pub path_and_query: &'a str,
    /// Where a background refresh goes.
    pub origin: RefreshVia,
}

/// The cache stage of a route: nothing when the route does not cache (`Ok` with no
/// context), an answer from the cache (`Err`), or the context for [`after`].
pub(super) async fn stage(
    policy: Arc<rampart_config::RouteCache>,
    l: Lookup<'_>,
    h: &mut http::HeaderMap,
    rec: Rec,
) -> Result<(CacheCtx, Rec), Response<EdgeBody>> {
    // Boxed: most routes do not cache, and the pipeline's future stays small.
    Box::pin(before(l, policy, h, rec)).await
}

/// Before any upstream is contacted: answer from a usable stored response (`Err`
/// with the response), or return what the cache needs to handle the origin's
/// answer, having put a stale copy's validators in `h` (the upstream headers).
async fn before(
    l: Lookup<'_>,
    rc: Arc<rampart_config::RouteCache>,
    h: &mut http::HeaderMap,
    mut rec: Rec,
) -> Result<(CacheCtx, Rec), Response<EdgeBody>> {
    let key = crate::cache::policy_key(
        &rc,
        l.view.tls,
        l.view.host.to_str().unwrap_or(""),
        l.view.path,
        l.view.query,
        h,
    );
    // PURGE on the public listener, when enabled, from allowed networks only.
    let purge_allow = &l.view.snap.validated.purge_allow;
    if l.view.method.as_str() == "PURGE" && !purge_allow.is_empty() {
        let allowed = purge_allow.iter().any(|c| c.contains(rec.client_ip));
        if !allowed {
            return Err(local_response(Reason::PurgeNotAllowed, rec, None));
        }
        let soft = h.get("x-purge-soft").is_some_and(|v| v.as_bytes() == b"1");
        let n = l.view.shared.cache.purge(&crate::cache::Purge::Url(key), soft);
        let body = format!("{{\"purged\":{n},\"soft\":{soft}}}\n");
        let mut resp = Response::new(EdgeBody::empty());
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), rec.request_id.header_value());
        rec.status = 200;
        rec.reason_text = Some("CACHE_PURGED");
        *resp.body_mut() = EdgeBody::full(body).on_complete(rec);
        return Err(resp);
    }
    let req_cc = crate::cache::cache_control(h);
    let safe = (*l.view.method == Method::GET || *l.view.method == Method::HEAD) && !crate::cache::bypassed(&rc, h);
    let authorized = h.contains_key(header::AUTHORIZATION);
    // §3.5: a request with Authorization is answered from the cache only by a stored
    // response that allows it.
    let allowed =
        |e: &crate::cache::Entry| !authorized || e.cc.public || e.cc.s_maxage.is_some() || e.cc.must_revalidate;
    let request_time = crate::cache::now_secs();
    let found = if safe {
        match l.view.shared.cache.lookup(&key, h) {
            Some(e) => Some(e),
            None => from_disk(l.view.shared, &key, h).await,
        }
        .filter(|e| allowed(e))
    } else {
        None
    };
    let now = crate::cache::now_secs();
    if let Some(e) = found.as_ref().filter(|e| e.usable(&req_cc, now)) {
        return Err(cached_response(e, h, l.view.method, "HIT", rec, l.view.snap.via));
    }
    let mut ctx = CacheCtx {
        leader: None,
        key,
        // The request as the client sent it: for Vary, Authorization and its own
        // conditionals (before the cache's validators replace them).
        req_headers: h.clone(),
        req_cc,
        settings: rc,
        entry: None,
        status: if safe { "MISS" } else { "BYPASS" },
        request_time,
        ranged: false,
    };
    if safe && *l.view.method == Method::GET && h.contains_key(header::RANGE) {
        // Like nginx's proxy cache: ask the origin for the whole object, so it can
        // be stored, and answer the range from it.
        h.remove(header::RANGE);
        h.remove(header::IF_RANGE);
        ctx.ranged = true;
    }
    if safe {
        match found {
            Some(e) if e.serves_while_revalidating(ctx.settings.stale_while_revalidate.get().as_secs_f64(), now) => {
                // Serve it stale now; one background request refreshes it.
                if let crate::cache::Fetch::Lead(leader) = l.view.shared.cache.fetch(&ctx.key) {
                    let mut refresh_headers = h.clone();
                    for (name, value) in e.validators() {
                        refresh_headers.insert(name, value);
                    }
                    spawn_refresh(Refresh {
                        policy: ctx.settings.clone(),
                        shared: l.view.shared.clone(),
                        origin: l.origin,
                        key: ctx.key.clone(),
                        entry: e.clone(),
                        headers: refresh_headers,
                        vary_source: ctx.req_headers.clone(),
                        path_and_query: l.path_and_query.to_string(),
                        client_ip: rec.client_ip,
                        leader,
                    });
                }
                return Err(cached_response(&e, h, l.view.method, "UPDATING", rec, l.view.snap.via));
            }
            Some(e) => {
                // Stale, or no-cache: validate with the origin.
                for name in [
                    header::IF_NONE_MATCH,
                    header::IF_MODIFIED_SINCE,
                    header::IF_MATCH,
                    header::IF_UNMODIFIED_SINCE,
                ] {
                    h.remove(name);
                }
                for (name, value) in e.validators() {
                    h.insert(name, value);
                }
                ctx.status = "EXPIRED";
                ctx.entry = Some(e);
            }
            None if ctx.req_cc.only_if_cached => {
                return Err(local_response(Reason::OnlyIfCachedMiss, rec, None));
            }
            None => match l.view.shared.cache.fetch(&ctx.key) {
                // Concurrent misses make one origin request: the first leads...
                crate::cache::Fetch::Lead(leader) => ctx.leader = Some(leader),
                // ...the others wait for it (bounded), then use what it stored,
                // under the same rules as any lookup.
                crate::cache::Fetch::Follow(rx) => {
                    if crate::cache::follow(rx, ctx.settings.coalesce_timeout.get()).await
                        && let Some(e) = l
                            .view
                            .shared
                            .cache
                            .lookup(&ctx.key, h)
                            .filter(|e| allowed(e) && e.usable(&ctx.req_cc, crate::cache::now_secs()))
                    {
                        return Err(cached_response(&e, h, l.view.method, "HIT", rec, l.view.snap.via));
                    }
                }
            },
        }
    }
    Ok((ctx, rec))
}

/// The origin's answer as the cache stage sees it.
pub(super) struct Fetched<'a> {
    pub shared: &'a Arc<Shared>,
    pub method: &'a Method,
    pub tls: bool,
    pub host: &'a HeaderValue,
    pub body_idle: Duration,
    pub deadline: Option<Instant>,
    pub via: bool,
}

/// After the origin answered: refresh a validated copy and answer from it, stand a
/// stale copy in for a 5xx, or answer a range from a just-stored object (`Err` with
/// the response); otherwise mark the response's cache status and return the fill
/// that stores its body as it streams, when it is storable.
pub(super) async fn after(
    f: Fetched<'_>,
    mut ctx: CacheCtx,
    rparts: &mut http::response::Parts,
    rbody: UpBody,
    mut rec: Rec,
) -> Result<(UpBody, Option<crate::body::Fill>, Rec), Response<EdgeBody>> {
    let mut fill = None;
    let response_time = crate::cache::now_secs();
    // A 304 to our validation: refresh the stored response and serve it (§4.3.4).
    if rparts.status == StatusCode::NOT_MODIFIED
        && let Some(e) = &ctx.entry
    {
        let refreshed = crate::cache::apply_ttl(
            &ctx.settings,
            e.refreshed(
                &rparts.headers,
                ctx.request_time,
                response_time,
                f.shared.cache.heuristic_max,
            ),
        );
        f.shared.cache.insert(&ctx.key, refreshed.clone());
        return Err(cached_response(
            &refreshed,
            &ctx.req_headers,
            f.method,
            "REVALIDATED",
            rec,
            f.via,
        ));
    }
    // An origin 5xx when a stale response may stand in for it (RFC 5861).
    if matches!(rparts.status.as_u16(), 500 | 502 | 503 | 504)
        && let Some(e) = ctx.stale_on_error()
    {
        return Err(cached_response(&e, &ctx.req_headers, f.method, "STALE", rec, f.via));
    }
    let resp_cc = crate::cache::cache_control(&rparts.headers);
    let unsafe_method = matches!(*f.method, Method::POST | Method::PUT | Method::DELETE | Method::PATCH);
    if unsafe_method && (rparts.status.is_success() || rparts.status.is_redirection()) {
        // §4.4: a successful unsafe request invalidates the target and the
        // same-origin Location / Content-Location.
        f.shared.cache.invalidate(&ctx.key);
        let host = f.host.to_str().unwrap_or("");
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(loc) = rparts.headers.get(&name).and_then(|v| v.to_str().ok())
                && let Some(target) = same_origin_path(loc, host)
            {
                f.shared.cache.invalidate(&crate::cache::key(f.tls, host, &target));
            }
        }
    }
    let length = rparts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = length.is_some_and(|n| n > f.shared.cache.max_object);
    let why_not = crate::cache::not_storable(
        f.method,
        &ctx.req_headers,
        &ctx.req_cc,
        rparts.status,
        &rparts.headers,
        &resp_cc,
        ctx.settings.allow_set_cookie,
    );
    let stored = why_not.is_none() && !too_large && ctx.status != "BYPASS";
    if stored && ctx.ranged && rparts.status == StatusCode::OK && length.is_some() {
        // A range was asked for and the whole object came back: read it (at most
        // max_object bytes, under the body timeouts), store it, answer the range.
        let body = match read_whole(rbody, f.shared.cache.max_object, f.body_idle, f.deadline).await {
            Ok(b) => b,
            Err(reason) => {
                return Err(local_response(reason, rec, None));
            }
        };
        let entry = store_response(
            f.shared,
            &StoreCtx::from(&ctx),
            rparts.status,
            rparts.headers.clone(),
            body,
            response_time,
        );
        drop(ctx.leader.take());
        let mut resp = cached_response(&entry, &ctx.req_headers, f.method, ctx.status, rec, f.via);
        for cookie in rparts.headers.get_all(header::SET_COOKIE) {
            resp.headers_mut().append(header::SET_COOKIE, cookie.clone());
        }
        return Err(resp);
    }
    if stored {
        let (status, headers) = (rparts.status, rparts.headers.clone());
        let store = f.shared.clone();
        // Waiting requests are released once the body is stored (or abandoned).
        let leader = ctx.leader.take();
        let ctx = StoreCtx::from(&ctx);
        fill = Some(crate::body::Fill::new(
            f.shared.cache.max_object,
            Box::new(move |body| {
                let _release_after_insert = leader;
                store_response(&store, &ctx, status, headers, body, response_time);
            }),
        ));
    }
    let status_text = ctx.status;
    f.shared.cache.stats.count(status_text);
    rparts
        .headers
        .insert(X_CACHE_STATUS.clone(), HeaderValue::from_static(status_text));
    let detail = match (status_text, stored) {
        ("BYPASS", _) => "rampart; fwd=bypass".to_string(),
        ("EXPIRED", true) => "rampart; fwd=stale; stored".to_string(),
        ("EXPIRED", false) => "rampart; fwd=stale".to_string(),
        (_, true) => "rampart; fwd=uri-miss; stored".to_string(),
        (_, false) => format!("rampart; fwd=uri-miss; detail={}", why_not.unwrap_or("too-large")),
    };
    if let Ok(v) = HeaderValue::from_str(&detail) {
        rparts.headers.insert(CACHE_STATUS.clone(), v);
    }
    rec.reason_text = Some(match status_text {
        "BYPASS" => "CACHE_BYPASS",
        "EXPIRED" => "CACHE_EXPIRED",
        _ => "CACHE_MISS",
    });
    Ok((rbody, fill, rec))
}

/// The path and query of a `Location`-style URL when it is on the request's own host
/// (a relative reference, or an absolute URL with the same host).
fn same_origin_path(loc: &str, host: &str) -> Option<String> {
    if loc.starts_with('/') && !loc.starts_with("//") {
        return Some(loc.to_string());
    }
    let uri: Uri = loc.parse().ok()?;
    let same = uri
        .host()
        .is_some_and(|h| h.eq_ignore_ascii_case(crate::routing::strip_port(host)));
    same.then(|| uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string())
}

static X_CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("x-cache-status");
static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");

/// What the cache knows about the request being forwarded.
pub(super) struct CacheCtx {
    /// This request leads the origin fetch of its key (coalescing).
    leader: Option<crate::cache::Leader>,
    key: String,
    req_headers: http::HeaderMap,
    req_cc: crate::cache::CacheControl,
    settings: Arc<rampart_config::RouteCache>,
    /// A stored response being validated.
    entry: Option<Arc<crate::cache::Entry>>,
    /// MISS, EXPIRED or BYPASS.
    status: &'static str,
    request_time: f64,
    /// The client asked for a range, which was removed from the origin request.
    ranged: bool,
}

impl CacheCtx {
    /// The origin failed: answer with `e`, a copy from [`CacheCtx::stale_on_error`].
    pub(super) fn answer_stale(
        &self,
        e: &crate::cache::Entry,
        method: &Method,
        rec: Rec,
        via: bool,
    ) -> Response<EdgeBody> {
        cached_response(e, &self.req_headers, method, "STALE", rec, via)
    }

    /// The stored response that may stand in for a failed origin, if any.
    pub(super) fn stale_on_error(&self) -> Option<Arc<crate::cache::Entry>> {
        let window = self.settings.stale_if_error.get().as_secs_f64();
        self.entry
            .as_ref()
            .filter(|e| e.serves_on_error(window, crate::cache::now_secs()))
            .cloned()
    }
}

/// What storing a response needs from the request that fetched it.
struct StoreCtx {
    key: String,
    req_headers: http::HeaderMap,
    request_time: f64,
    policy: Arc<rampart_config::RouteCache>,
}

impl From<&CacheCtx> for StoreCtx {
    fn from(c: &CacheCtx) -> StoreCtx {
        StoreCtx {
            key: c.key.clone(),
            req_headers: c.req_headers.clone(),
            request_time: c.request_time,
            policy: c.settings.clone(),
        }
    }
}

/// Store a complete origin response under the route's policy; returns what was stored.
fn store_response(
    shared: &Shared,
    ctx: &StoreCtx,
    status: StatusCode,
    headers: http::HeaderMap,
    body: bytes::Bytes,
    response_time: f64,
) -> crate::cache::Entry {
    let age = headers.get(header::AGE).cloned();
    let entry = crate::cache::Entry::new(
        status,
        headers,
        body,
        ctx.request_time,
        response_time,
        &ctx.req_headers,
        shared.cache.heuristic_max,
    )
    .with_age(age.as_ref())
    .with_tags(&shared.cache.tag_header);
    let entry = crate::cache::apply_ttl(&ctx.policy, entry);
    shared.cache.insert(&ctx.key, entry.clone());
    shared.cache.stats.stored.inc();
    entry
}

/// Read a whole upstream body into memory: at most `limit` bytes, each frame within
/// `idle`, all of it before `deadline`.
async fn read_whole<B>(
    mut body: B,
    limit: usize,
    idle: Duration,
    deadline: Option<Instant>,
) -> Result<bytes::Bytes, Reason>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    loop {
        let next = tokio::time::timeout(idle, body.frame());
        let frame = match deadline {
            Some(d) => match tokio::time::timeout_at(d, next).await {
                Ok(f) => f,
                Err(_) => return Err(Reason::UpstreamRequestTimeout),
            },
            None => next.await,
        };
        match frame {
            Err(_) => return Err(Reason::UpstreamBodyIdleTimeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(_))) => return Err(Reason::UpstreamBodyError),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    if buf.len() + d.len() > limit {
                        return Err(Reason::UpstreamInvalidResponse);
                    }
                    buf.extend_from_slice(&d);
                }
            }
        }
    }
}

/// After a memory miss: the disk tier's copy, read and checked on the blocking pool,
/// then put back in memory.
async fn from_disk(shared: &Arc<Shared>, key: &str, h: &http::HeaderMap) -> Option<Arc<crate::cache::Entry>> {
    shared.cache.disk.as_ref()?;
    let (s, k, req) = (shared.clone(), key.to_string(), h.clone());
    let entry = tokio::task::spawn_blocking(move || s.cache.disk.as_ref().and_then(|d| d.load(&k, &req)))
        .await
        .ok()??;
    Some(shared.cache.promote(key, entry))
}

/// Where a background refresh sends its request.
pub(super) enum RefreshVia {
    /// A pool, with the Host the route sends (`None`: the backend's own).
    Pool(Arc<crate::upstream::Pool>, Option<HeaderValue>),
    /// A provider chain (failover applies as for any request).
    Chain(Arc<crate::chain::Chain>),
}

/// A background refresh of a stale entry (stale-while-revalidate).
struct Refresh {
    shared: Arc<Shared>,
    origin: RefreshVia,
    key: String,
    entry: Arc<crate::cache::Entry>,
    /// Prepared upstream headers plus the entry's validators.
    headers: http::HeaderMap,
    /// The request's own headers, for Vary.
    vary_source: http::HeaderMap,
    path_and_query: String,
    client_ip: std::net::IpAddr,
    policy: Arc<rampart_config::RouteCache>,
    leader: crate::cache::Leader,
}

/// Longest a chain refresh may take: the provider timeouts bound each attempt; this
/// bounds the whole, body included.
const CHAIN_REFRESH_LIMIT: Duration = Duration::from_secs(60);

impl Refresh {
    /// Send the refresh request; the origin's response, if any.
    async fn send(&self) -> Option<Response<Incoming>> {
        match &self.origin {
            RefreshVia::Pool(pool, host) => {
                let backend = pool.pick(&Uri::default(), &self.vary_source, self.client_ip)?;
                let uri = Uri::builder()
                    .scheme(backend.scheme.clone())
                    .authority(backend.authority.clone())
                    .path_and_query(self.path_and_query.as_str())
                    .build()
                    .ok()?;
                let mut req = Request::new(UpstreamBody::Empty);
                *req.uri_mut() = uri;
                *req.headers_mut() = self.headers.clone();
                req.headers_mut()
                    .insert(header::HOST, host.clone().unwrap_or_else(|| backend.host_value.clone()));
                pool.client.get().request(req).await.ok()
            }
            RefreshVia::Chain(chain) => {
                let (path, query) = match self.path_and_query.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (self.path_and_query.as_str(), None),
                };
                let req = crate::chain::ChainRequest {
                    method: &Method::GET,
                    path,
                    query,
                    headers: &self.headers,
                    session: None,
                    request_id: "cache-refresh",
                    deadline: None,
                };
                let result = crate::chain::forward(chain, &self.shared.chain_health, &req, UpstreamBody::Empty).await;
                self.shared.control.observe(chain, &result.trace);
                result.response
            }
        }
    }

    /// How long the whole refresh may take.
    fn limit(&self) -> Duration {
        match &self.origin {
            RefreshVia::Pool(pool, _) => pool.timeouts.response_header.get() + pool.timeouts.body_idle.get(),
            RefreshVia::Chain(_) => CHAIN_REFRESH_LIMIT,
        }
    }
}

fn spawn_refresh(r: Refresh) {
    tokio::spawn(async move {
        let request_time = crate::cache::now_secs();
        let fetched = async {
            let resp = r.send().await?;
            let (parts, body) = resp.into_parts();
            let response_time = crate::cache::now_secs();
            if parts.status == StatusCode::NOT_MODIFIED {
                let e = r.entry.refreshed(
                    &parts.headers,
                    request_time,
                    response_time,
                    r.shared.cache.heuristic_max,
                );
                return Some(crate::cache::apply_ttl(&r.policy, e));
            }
            let resp_cc = crate::cache::cache_control(&parts.headers);
            crate::cache::not_storable(
                &Method::GET,
                &r.vary_source,
                &crate::cache::CacheControl::default(),
                parts.status,
                &parts.headers,
                &resp_cc,
                false,
            )
            .is_none()
            .then_some(())?;
            let bytes = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, r.shared.cache.max_object))
                .await
                .ok()?
                .to_bytes();
            let age = parts.headers.get(header::AGE).cloned();
            Some(
                crate::cache::Entry::new(
                    parts.status,
                    parts.headers,
                    bytes,
                    request_time,
                    response_time,
                    &r.vary_source,
                    r.shared.cache.heuristic_max,
                )
                .with_age(age.as_ref())
                .with_tags(&r.shared.cache.tag_header),
            )
            .map(|e| crate::cache::apply_ttl(&r.policy, e))
        };
        if let Ok(Some(e)) = tokio::time::timeout(r.limit(), fetched).await {
            r.shared.cache.insert(&r.key, e);
            r.shared.cache.stats.stored.inc();
        }
        drop(r.leader);
    });
}

/// Answer from a stored response: its status and headers, a correct `Age`, the
/// cache status, and the body (none for HEAD). The client's own conditionals are
/// answered with 304 when they match (§4.3.2).
fn cached_response(
    e: &crate::cache::Entry,
    req: &http::HeaderMap,
    method: &Method,
    status_text: &'static str,
    mut rec: Rec,
    via: bool,
) -> Response<EdgeBody> {
    let now = crate::cache::now_secs();
    let age = e.current_age(now).max(0.0).floor() as u64;
    let not_modified = client_conditional_matches(e, req);
    // Range requests are answered from the complete stored object (GET of a 200 only).
    let ranged = if !not_modified && *method == Method::GET && e.status == StatusCode::OK {
        crate::cache::range(req, &e.headers, e.body.len() as u64)
    } else {
        crate::cache::RangeAnswer::Full
    };
    let mut resp = Response::new(EdgeBody::empty());
    *resp.status_mut() = match (&ranged, not_modified) {
        (_, true) => StatusCode::NOT_MODIFIED,
        (crate::cache::RangeAnswer::Partial(..), _) => StatusCode::PARTIAL_CONTENT,
        (crate::cache::RangeAnswer::Unsatisfiable, _) => StatusCode::RANGE_NOT_SATISFIABLE,
        (crate::cache::RangeAnswer::Full, _) => e.status,
    };
    let h = resp.headers_mut();
    *h = e.headers.clone();
    let total = e.body.len();
    let body_bytes = match ranged {
        crate::cache::RangeAnswer::Partial(a, b) => {
            let (a, b) = (usize::try_from(a).unwrap_or(0), usize::try_from(b).unwrap_or(0));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{total}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(b + 1 - a));
            e.body.slice(a..=b)
        }
        crate::cache::RangeAnswer::Unsatisfiable => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            bytes::Bytes::new()
        }
        crate::cache::RangeAnswer::Full => e.body.clone(),
    };
    if e.status == StatusCode::OK {
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    if not_modified {
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::TRANSFER_ENCODING,
        ] {
            h.remove(name);
        }
    }
    headers::remove_hop_by_hop(h, false);
    h.insert(header::AGE, HeaderValue::from(age));
    h.insert(X_CACHE_STATUS.clone(), HeaderValue::from_static(status_text));
    let ttl = (e.freshness - e.current_age(now)).floor() as i64;
    let detail = match status_text {
        "HIT" => format!("rampart; hit; ttl={ttl}"),
        "UPDATING" => format!("rampart; hit; ttl={ttl}; detail=stale-while-revalidate"),
        "STALE" => format!("rampart; hit; ttl={ttl}; detail=stale-if-error"),
        // Just fetched whole for a range request, stored, and answered from the copy.
        "MISS" => "rampart; fwd=uri-miss; stored".to_string(),
        "EXPIRED" => "rampart; fwd=stale; stored".to_string(),
        _ => "rampart; fwd=stale; fwd-status=304".to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&detail) {
        h.insert(CACHE_STATUS.clone(), v);
    }
    if via {
        headers::append_via(h, Version::HTTP_11);
    }
    h.insert(X_REQUEST_ID.clone(), rec.request_id.header_value());
    rec.status = resp.status().as_u16();
    rec.shared.cache.stats.count(status_text);
    rec.reason_text = Some(match status_text {
        "HIT" => "CACHE_HIT",
        "STALE" => "CACHE_STALE",
        "UPDATING" => "CACHE_UPDATING",
        "MISS" => "CACHE_MISS",
        "EXPIRED" => "CACHE_EXPIRED",
        _ => "CACHE_REVALIDATED",
    });
    let body = if not_modified || *method == Method::HEAD {
        EdgeBody::empty()
    } else {
        EdgeBody::full(body_bytes)
    };
    *resp.body_mut() = body.on_complete(rec);
    resp
}

/// `If-None-Match` (weak comparison, `*`), else `If-Modified-Since`, against a stored response.
fn client_conditional_matches(e: &crate::cache::Entry, req: &http::HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = e.headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return inm.split(',').any(|t| t.trim() == "*" || weak(t) == weak(etag));
    }
    if let (Some(ims), Some(lm)) = (
        req.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok()),
        e.headers.get(header::LAST_MODIFIED).and_then(|v| v.to_str().ok()),
    ) && let (Ok(ims), Ok(lm)) = (httpdate::parse_http_date(ims), httpdate::parse_http_date(lm))
    {
        return lm <= ims;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_locations() {
        assert_eq!(same_origin_path("/a?b=1", "x.test:8080").as_deref(), Some("/a?b=1"));
        assert_eq!(
            same_origin_path("https://X.test/p", "x.test:8080").as_deref(),
            Some("/p")
        );
        assert_eq!(same_origin_path("https://other.test/p", "x.test"), None);
        assert_eq!(same_origin_path("//other.test/p", "x.test"), None);
    }
}
