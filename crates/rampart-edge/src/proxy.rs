//! The request pipeline, top to bottom:
//!
//! request id → limits (URI 414, headers 431, body 413) → host → site → HTTPS
//! redirect → route → backend → upstream request (rewrite, hop-by-hop removal,
//! `X-Forwarded-*`, `Via`) → send with timeouts → response (hop-by-hop removal,
//! `Via`, `x-request-id`, explanation) → streamed body → access log and metrics
//! when the body ends.

use crate::Shared;
use crate::access_log::{Entry, Text};
use crate::body::{BodyOutcome, ClientBody, ClientIn, Completion, EdgeBody, RequestBodyState, UpstreamBody};
use crate::headers::{
    self, RequestId, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_RAMPART_ATTEMPTS, X_RAMPART_REASON,
    X_RAMPART_ROUTE, X_RAMPART_UPSTREAM, X_REQUEST_ID,
};
use crate::reason::Reason;
use crate::routing::Matched;
use crate::snapshot::{HostMode, Rewrite, RouteEntry, Snapshot};
use crate::upstream::{Backend, classify};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper_util::rt::TokioIo;
use rampart_config::Protocol;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Instant;

mod caching;

/// What the pipeline knows about the client connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP as a header value, for `X-Forwarded-For` (made once per connection).
    pub peer_value: HeaderValue,
    pub tls: bool,
    /// Requests received on this connection so far.
    requests: std::sync::atomic::AtomicU64,
    /// What the HTTP/1 framing guard found in the request heads.
    pub verdicts: Arc<crate::security::guard::Verdicts>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        ConnInfo::with_history(peer, tls, 0, Arc::default())
    }

    /// A parked plain connection served again, `requests` requests into its life.
    pub fn resumed(peer: SocketAddr, requests: u64) -> ConnInfo {
        let verdicts = Arc::new(crate::security::guard::Verdicts::resumed(requests));
        ConnInfo::with_history(peer, false, requests, verdicts)
    }

    fn with_history(
        peer: SocketAddr,
        tls: bool,
        requests: u64,
        verdicts: Arc<crate::security::guard::Verdicts>,
    ) -> ConnInfo {
        // Written by hand: `Display` for an address cost about 1.5 k instructions,
        // paid by every new or resumed connection.
        let mut text = Vec::with_capacity(48);
        crate::access_log::write_ip(&mut text, peer.ip());
        let peer_value =
            HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            peer_value,
            tls,
            requests: std::sync::atomic::AtomicU64::new(requests),
            verdicts,
        }
    }

    /// Requests received on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The record moves through every stage and ends as the response body's completion:
/// boxed once at the start, it moves as a pointer rather than 400 bytes at a time.
type Rec = Box<Record>;

/// Who served a request.
enum Served {
    Nobody,
    /// Backend `i` of the record's pool.
    Backend(usize),
    /// A provider of a chain.
    Provider(Arc<str>),
}

/// Everything the access log and metrics need, finished when the response body ends.
struct Record {
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    start: Instant,
    request_id: RequestId,
    client_ip: IpAddr,
    /// Shares hyper's buffers: no copy per request.
    host: Option<HeaderValue>,
    method: Method,
    uri: Uri,
    version: Version,
    status: u16,
    route: Option<Arc<RouteEntry>>,
    /// Who served: a backend of `pool` (by index: no reference count to move), or a
    /// chain's provider.
    upstream: Served,
    reason: Reason,
    body_state: Option<Arc<RequestBodyState>>,
    /// The length of a request body that came whole with its head (no
    /// `body_state` then: it was read before the pipeline began).
    body_whole: u64,
    /// Counts the request against its backend until the response body ends.
    in_flight: Option<crate::balance::InFlight>,
    /// The route's pool that served: its own (`Some(false)`) or its fallback
    /// (`Some(true)`); see [`Record::pool`]. Not an `Arc`: the route holds it.
    pool: Option<bool>,
    /// Attempts made (1 without retries).
    tries: u32,
    /// A chain decision's reason code, which the access log shows instead of `reason`.
    reason_text: Option<&'static str>,
    /// `pool#index:OUTCOME,...` for `x-rampart-attempts`, built only when explaining.
    attempts: Option<String>,
    /// What exactly a refusal objected to (JSON `detail`, access log `detail`).
    detail: Option<Arc<str>>,
    /// The HTTP/1 upstream connection, returned to its pool when the response body
    /// was read to the end.
    checkin: Option<crate::h1pool::Checkin>,
}

impl Completion for Record {
    fn finish(mut self: Box<Self>, outcome: BodyOutcome, bytes_out: u64) {
        if let Some(c) = self.checkin.take()
            && outcome == BodyOutcome::Complete
        {
            c.give_back();
        }
        let mut reason = self.reason;
        match outcome {
            BodyOutcome::IdleTimeout => reason = Reason::UpstreamBodyIdleTimeout,
            BodyOutcome::RequestTimeout => reason = Reason::UpstreamRequestTimeout,
            BodyOutcome::UpstreamError => reason = Reason::UpstreamBodyError,
            BodyOutcome::Complete | BodyOutcome::Aborted => {}
        }
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start);
        let bytes_in = self
            .body_state
            .as_ref()
            .map_or(self.body_whole, |s| s.bytes.load(Ordering::Relaxed));
        let m = self.route.as_ref().map_or(&self.snap.unmatched, |r| &r.metrics);
        m.count_status(self.status);
        m.duration.observe(elapsed.as_secs_f64());
        if bytes_in > 0 {
            m.bytes_in.inc_by(bytes_in);
        }
        m.bytes_out.inc_by(bytes_out);
        if reason != self.reason
            && let Some(p) = self.pool()
        {
            p.metrics.upstream_error(reason);
        }
        self.record_passive_health(reason, now);
        let log = &self.snap.log;
        if log.enabled() {
            log.log(&Entry {
                time: crate::access_log::wall_clock(now.into_std()),
                request_id: crate::access_log::Plain::request_id(&self.request_id),
                client_ip: self.client_ip,
                host: self.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("-"),
                method: crate::access_log::Plain::method(&self.method),
                path: self.uri.path(),
                protocol: crate::access_log::Plain::version(self.version),
                status: self.status,
                bytes_in,
                bytes_out,
                duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                site: self.route.as_ref().map_or("-".into(), |r| Text::Json(&r.site_json)),
                route: self.route.as_ref().map_or("-".into(), |r| Text::Json(&r.id_json)),
                upstream: self.upstream_for_log(),
                attempts: self.tries,
                reason: match (self.reason_text, reason) {
                    (Some(text), Reason::Proxied) => text,
                    _ => reason.as_str(),
                },
                detail: self.detail.as_deref(),
            });
        }
    }
}

impl Record {
    /// Add a security decision that did not refuse the request (a logged or shadowed
    /// rule) to `detail`: the access log has it, and `x-rampart-security` when the
    /// site explains.
    fn note(&mut self, decision: &str) {
        self.detail = Some(match self.detail.take() {
            Some(d) => Arc::from(format!("{d},{decision}")),
            None => Arc::from(decision),
        });
    }

    /// Feed the exchange's outcome to the backend's circuit breaker. Upstream errors
    /// and 502/503/504 answers are failures; a response the upstream gave otherwise is
    /// a success; problems with the client's own request are neither.
    fn record_passive_health(&self, reason: Reason, now: Instant) {
        let ok = if reason.is_upstream_error() {
            false
        } else if reason == Reason::Proxied {
            !matches!(self.status, 502..=504)
        } else {
            return;
        };
        self.report_backend_result(ok, now);
    }

    fn report_backend_result(&self, ok: bool, now: Instant) {
        let (Some(pool), Some(inflight), Some(label)) = (self.pool(), &self.in_flight, self.upstream_label()) else {
            return;
        };
        if !pool.outlier.enabled {
            return;
        }
        let state = inflight.state();
        if let Some(t) = state.record_result(ok, &pool.outlier, pool.may_eject(), now.into_std()) {
            let to = match t {
                crate::health::Transition::Ejected => "ejected",
                crate::health::Transition::HalfOpen => "half_open",
                crate::health::Transition::Closed => {
                    state.mark_recovered();
                    "healthy"
                }
            };
            crate::health::report_transition(&self.shared.me_weak(), &pool.name, label, state, "passive", to);
        }
    }

    /// The pool that served, if one did.
    fn pool(&self) -> Option<&Arc<crate::upstream::Pool>> {
        let route = self.route.as_ref()?;
        if self.pool? {
            route.fallback.as_ref()
        } else {
            route.pool.as_ref()
        }
    }

    /// The label of who served, for the access log and health reports.
    fn upstream_label(&self) -> Option<&str> {
        match &self.upstream {
            Served::Nobody => None,
            Served::Backend(i) => self.pool()?.backends.get(*i).map(|b| &*b.label),
            Served::Provider(p) => Some(p),
        }
    }

    /// Who served, for the access log: a backend's URL as encoded when the
    /// configuration was loaded.
    fn upstream_for_log(&self) -> Text<'_> {
        match &self.upstream {
            Served::Nobody => "-".into(),
            Served::Backend(i) => self
                .pool()
                .and_then(|p| p.backends.get(*i))
                .map_or("-".into(), |b| Text::Json(&b.label_json)),
            Served::Provider(p) => Text::Str(p),
        }
    }

    /// Note one attempt and its outcome; the text is written only when explaining.
    fn note_attempt(&mut self, pool: &str, backend: usize, outcome: Outcome, explain: bool) {
        use std::fmt::Write;
        self.tries += 1;
        if explain {
            let a = self.attempts.get_or_insert_with(String::new);
            if !a.is_empty() {
                a.push(',');
            }
            let _ = write!(a, "{pool}#{backend}:{outcome}");
        }
    }
}

/// How an attempt ended, as `x-rampart-attempts` shows it.
enum Outcome {
    Success,
    Status(u16),
    Failed(Reason),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Success => f.write_str("SUCCESS"),
            Outcome::Status(s) => write!(f, "{s}"),
            Outcome::Failed(r) => f.write_str(r.as_str()),
        }
    }
}

/// A response the edge makes itself, with a JSON body naming the reason.
/// A WAF rule blocks: its status, and its body or the default JSON naming the rule
/// and the request id.
#[cold]
fn waf_block(mut rec: Rec, block: crate::security::waf::Block) -> Response<EdgeBody> {
    rec.shared.metrics.security("waf", Reason::WafBlocked.as_str(), "block");
    rec.detail = Some(Arc::from(format!("rule:{}", block.rule)));
    let (body, extra) = match block.body {
        Some(b) => (
            b,
            Some((
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )),
        ),
        None => (
            bytes::Bytes::from(format!(
                "{}\n",
                serde_json::json!({
                    "status": block.status.as_u16(),
                    "reason": Reason::WafBlocked.as_str(),
                    "rule": &*block.rule,
                    "request_id": rec.request_id.as_str(),
                })
            )),
            None,
        ),
    };
    respond(Reason::WafBlocked, block.status, body, rec, extra)
}

/// A security stage refuses the request: counted, logged with its detail, answered.
#[cold]
fn refuse(mut rec: Rec, stage: &'static str, reason: Reason, detail: &str) -> Response<EdgeBody> {
    rec.shared.metrics.security(stage, reason.as_str(), "block");
    rec.detail = Some(Arc::from(detail));
    local_response(reason, rec, None)
}

#[cold]
fn local_response(reason: Reason, rec: Rec, extra: Option<(header::HeaderName, HeaderValue)>) -> Response<EdgeBody> {
    let status = reason.status();
    let body = reason.json_body(status.as_u16(), rec.request_id.as_str(), rec.detail.as_deref());
    respond(reason, status, bytes::Bytes::from(body), rec, extra)
}

/// An answer the edge makes itself: status, JSON (or configured) body, request id,
/// reason, and the completion record for the access log and metrics.
fn respond(
    reason: Reason,
    status: StatusCode,
    body: bytes::Bytes,
    rec: Rec,
    extra: Option<(header::HeaderName, HeaderValue)>,
) -> Response<EdgeBody> {
    let mut resp = Response::new(EdgeBody::empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(X_REQUEST_ID.clone(), rec.request_id.header_value());
    h.insert(X_RAMPART_REASON.clone(), HeaderValue::from_static(reason.as_str()));
    if matches!(
        reason,
        Reason::HeadersTooLarge
            | Reason::UriTooLong
            | Reason::BadRequest
            | Reason::RequestBodyTooLarge
            | Reason::BadFraming
            | Reason::BadHost
            | Reason::BadPath
    ) {
        // After a framing or size problem the rest of the connection cannot be trusted.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some((k, v)) = extra {
        h.insert(k, v);
    }
    if let Some(a) = rec.attempts.as_deref().and_then(|a| HeaderValue::from_str(a).ok()) {
        h.insert(X_RAMPART_ATTEMPTS.clone(), a);
    }
    let is_head = rec.method == Method::HEAD;
    let mut rec = rec;
    rec.status = status.as_u16();
    rec.reason = reason;
    let body = if is_head {
        EdgeBody::empty()
    } else {
        EdgeBody::full(body)
    };
    *resp.body_mut() = body.on_complete(rec);
    resp
}

/// The HTTP cache stage, for routes with a cache policy: answer from the cache
/// (returning the answer from the enclosing function), or go on with what the cache
/// needs after the origin answers. Routes without a cache skip it without moving
/// the record through it or building the lookup (`origin` is evaluated only then).
macro_rules! cache_stage {
    ($route:expr, $view:expr, $pq:expr, $origin:expr, $h:ident, $rec:ident) => {
        match $route.cache.clone() {
            None => None,
            Some(policy) => {
                let lookup = caching::Lookup {
                    view: $view,
                    path_and_query: $pq,
                    origin: $origin,
                };
                match caching::stage(policy, lookup, &mut $h, $rec).await {
                    Ok((ctx, r)) => {
                        $rec = r;
                        Some(ctx)
                    }
                    Err(answer) => return Ok(answer),
                }
            }
        }
    };
}

/// The pipeline for hyper's server. hyper keeps one allocation the size of this
/// future for each connection's whole life (HTTP/1's in-flight slot), idle or not,
/// so the pipeline's state (about 4.6 KiB) lives in its own box, allocated per request
/// instead: 15.6 against 18.2 KiB per idle connection, with no CPU difference
/// measured (see docs/architecture.md).
pub fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<ClientIn>,
) -> impl Future<Output = Result<Response<EdgeBody>, Infallible>> + Send {
    // Chosen here, not held as a flag across the pipeline's await (which made
    // hyper's per-connection slot 150 bytes larger).
    if req.version() == Version::HTTP_2 {
        futures_util::future::Either::Left(handle_as::<true>(shared, conn, req))
    } else {
        futures_util::future::Either::Right(handle_as::<false>(shared, conn, req))
    }
}

async fn handle_as<const H2: bool>(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<ClientIn>,
) -> Result<Response<EdgeBody>, Infallible> {
    // Until the response body ends, the connection's framing guard knows a response
    // of the service's is being written (hyper's own error answers are rewritten).
    let in_flight = crate::security::guard::InFlight::enter(&conn.verdicts);
    let mut limit = None;
    let Ok(mut resp) = Box::pin(handle_request(&shared, &conn, req, &mut limit, false, None, None)).await;
    add_rate_limit(&mut resp, limit);
    if H2 {
        // h2's encoder keeps the values it indexes for the connection's life.
        crate::headers::detach_values(resp.headers_mut());
    }
    Ok(resp.map(|b| b.in_flight(in_flight)))
}

/// The tightest rate limit a request passed, for the client to pace itself
/// (`limit` as [`handle_request`] left it).
pub(crate) fn add_rate_limit(resp: &mut Response<EdgeBody>, limit: Option<(HeaderValue, HeaderValue)>) {
    if let Some((policy, state)) = limit {
        resp.headers_mut().insert(RATELIMIT_POLICY.clone(), policy);
        resp.headers_mut().insert(RATELIMIT.clone(), state);
    }
}

/// A head hyper could not parse, answered by the framing guard: counted and logged
/// like every other answer (with what is known: no host, method or path).
pub fn log_refusal(shared: &Shared, peer: std::net::SocketAddr, r: &crate::security::guard::Refusal) {
    let snap = shared.snapshot.load();
    snap.unmatched.count_status(r.status);
    snap.unmatched.bytes_out.inc_by(r.bytes as u64);
    let log = &snap.log;
    if log.enabled() {
        log.log(&Entry {
            time: std::time::SystemTime::now(),
            request_id: crate::access_log::Plain::request_id(&r.request_id),
            client_ip: peer.ip(),
            host: "-",
            method: crate::access_log::Plain::UNKNOWN,
            path: "-",
            protocol: crate::access_log::Plain::version(Version::HTTP_11),
            status: r.status,
            bytes_in: 0,
            bytes_out: r.bytes as u64,
            duration_us: 0,
            site: "-".into(),
            route: "-".into(),
            upstream: "-".into(),
            attempts: 0,
            reason: r.reason,
            detail: None,
        });
    }
}

static RATELIMIT_POLICY: header::HeaderName = header::HeaderName::from_static("ratelimit-policy");
static RATELIMIT: header::HeaderName = header::HeaderName::from_static("ratelimit");

/// `RateLimit: "name";r=REMAINING;t=SECONDS` (draft-ietf-httpapi-ratelimit-headers).
fn ratelimit_value(rule: &crate::security::rate_limit::Rule, remaining: u32, reset_ns: u64) -> HeaderValue {
    let t = reset_ns.div_ceil(1_000_000_000);
    HeaderValue::from_str(&format!(
        "\"{}\";r={remaining};t={t}",
        rule.name.replace(['"', '\\'], "")
    ))
    .unwrap_or(HeaderValue::from_static("\"limit\""))
}

/// The pipeline. It leaves the tightest rate limit the request passed in `limit`,
/// for [`add_rate_limit`]. The lean HTTP/1 server holds its state in the
/// connection's task, which ends when the connection is parked: no box to allocate
/// and copy the state into per request (hyper's path boxes it, see [`handle`]).
///
/// `passthrough`: the caller writes the response head itself and takes the header
/// lines an upstream response may carry beside its map
/// ([`EdgeBody::take_passthrough`]). `timer`: a timer of the caller's task to reuse
/// for the wait for the upstream's response head (it is left set to that deadline).
/// `snap`: the configuration to serve by, when the caller has it at hand (else the
/// current one is loaded).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn handle_request(
    shared: &Arc<Shared>,
    conn: &ConnInfo,
    mut req: Request<ClientIn>,
    limit: &mut Option<(HeaderValue, HeaderValue)>,
    passthrough: bool,
    mut timer: Option<&mut crate::timer::LazyTimer>,
    snap: Option<&Arc<Snapshot>>,
) -> Result<Response<EdgeBody>, Infallible> {
    let start = Instant::now();
    // Borrowed from the caller when it has one at hand: the record's is the only
    // reference taken per request.
    let loaded;
    let snap = match snap {
        Some(s) => s,
        None => {
            loaded = shared.snapshot.load_full();
            &loaded
        }
    };
    let peer = conn.peer.ip();
    let trusted_peer = headers::is_trusted(&snap.trusted, peer);

    // An incoming id counts only from a trusted proxy: no lookup for anyone else.
    let request_id = RequestId::given_or_new(trusted_peer.then(|| req.headers().get(&X_REQUEST_ID)).flatten());
    // A head the lean HTTP/1 server read has no `Content-Length`, `Transfer-Encoding`,
    // `Upgrade` or `Expect` field (it hands those to hyper): none to look for.
    let lean_head = matches!(req.body(), ClientIn::Empty);
    // The Host fields, looked up once: for the framing check and the host.
    let host_fields = crate::security::framing::HostFields::of(req.headers());
    let host_value: Option<HeaderValue> = host_fields.first.cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });

    let mut rec = Box::new(Record {
        shared: shared.clone(),
        snap: snap.clone(),
        start,
        request_id,
        client_ip: headers::client_ip(req.headers(), peer, &snap.trusted),
        host: host_value.clone(),
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        status: 0,
        route: None,
        upstream: Served::Nobody,
        reason: Reason::Proxied,
        body_state: None,
        body_whole: 0,
        in_flight: None,
        pool: None,
        tries: 0,
        reason_text: None,
        attempts: None,
        detail: None,
        checkin: None,
    });

    // Limits.
    let target_len = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    if target_len > snap.limits.max_uri {
        return Ok(local_response(Reason::UriTooLong, rec, None));
    }
    if req.headers().len() > snap.limits.max_headers
        || headers::header_bytes(req.headers()) > snap.limits.max_header_bytes
    {
        return Ok(local_response(Reason::HeadersTooLarge, rec, None));
    }
    // Framing: refuse what two parsers could read differently.
    let nth = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if conn.verdicts.ambiguous(nth) {
        return Ok(refuse(
            rec,
            "framing",
            Reason::BadFraming,
            "content-length-with-transfer-encoding",
        ));
    }
    if let Err(refusal) =
        crate::security::framing::check_request(req.uri(), req.version(), req.headers(), host_fields, lean_head)
    {
        let (reason, detail) = match refusal {
            crate::security::framing::Refusal::Framing(d) => (Reason::BadFraming, d),
            crate::security::framing::Refusal::Host(d) => (Reason::BadHost, d),
        };
        return Ok(refuse(rec, "framing", reason, detail));
    }
    // WebSocket over HTTP/2 (RFC 8441): an extended CONNECT with `:protocol websocket`.
    // It is routed like a request for its path and tunnelled to an HTTP/1.1 upstream
    // as a WebSocket upgrade. Any other CONNECT is refused.
    let h2_websocket = req.method() == Method::CONNECT
        && req.version() == Version::HTTP_2
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if req.method() == Method::CONNECT && !h2_websocket {
        return Ok(local_response(Reason::MethodNotAllowed, rec, None));
    }
    // One normalised path for routing, every later stage, the cache key and the
    // upstream, so none of them can be bypassed by a different reading.
    let normalize = &snap.validated.config.server.normalize;
    let path = match crate::security::normalize::normalize_path(req.uri().path(), normalize) {
        Ok(p) => p.into_owned(),
        Err(e) => return Ok(refuse(rec, "normalize", Reason::BadPath, e.as_str())),
    };
    if let Some(Err(e)) = req.uri().query().map(crate::security::normalize::check_query) {
        return Ok(refuse(rec, "normalize", Reason::BadPath, e.as_str()));
    }
    let Some(host_value) = host_value else {
        return Ok(local_response(Reason::BadRequest, rec, None));
    };

    // Site and route.
    let host_str = host_value.to_str().unwrap_or("");
    let Some(site_idx) = snap.router.site(host_str) else {
        return Ok(local_response(Reason::NoMatchingSite, rec, None));
    };
    let site = &snap.sites[site_idx];
    if site.https_redirect && !conn.tls {
        let host = crate::routing::strip_port(host_str);
        let port = if site.https_port == 443 {
            String::new()
        } else {
            format!(":{}", site.https_port)
        };
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let loc = HeaderValue::from_str(&format!("https://{host}{port}{pq}")).ok();
        return Ok(local_response(
            Reason::HttpsRedirect,
            rec,
            loc.map(|v| (header::LOCATION, v)),
        ));
    }
    let Some((route, matched)) = snap.router.sites[site_idx].route(&path) else {
        return Ok(local_response(Reason::NoMatchingRoute, rec, None));
    };
    rec.route = Some(route.clone());
    let explain = site.explain;
    // Upstream header fields no stage reads or sets may pass as lines: not when the
    // explanation headers replace upstream ones, or the cache stores the response.
    let passthrough = passthrough && !explain && route.cache.is_none();

    // Access lists: the site's, then the route's.
    for acl in [&site.access, &route.access].into_iter().flatten() {
        if let Err(detail) = acl.check(rec.client_ip, req.headers()) {
            return Ok(refuse(rec, "acl", Reason::AccessDenied, detail));
        }
        acl.strip(req.headers_mut());
    }

    let declared_length = if lean_head {
        None
    } else {
        req.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(len) = declared_length
        && len > snap.limits.max_body
    {
        return Ok(local_response(Reason::RequestBodyTooLarge, rec, None));
    }

    // Upgrades: HTTP/1.1 `Upgrade` (WebSocket and friends), and WebSocket over HTTP/2.
    let upgrade = if !route.websocket {
        None
    } else if h2_websocket {
        Some(HeaderValue::from_static("websocket"))
    } else if req.version() == Version::HTTP_11 && !lean_head {
        headers::upgrade_protocol(req.headers())
    } else {
        None
    };
    if h2_websocket && (upgrade.is_none() || route.pool.is_none()) {
        // WebSockets are off on this route, or it is served by a provider chain.
        return Ok(local_response(Reason::MethodNotAllowed, rec, None));
    }
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let (parts, body) = req.into_parts();

    // WAF rules, in order; they may read the body up to the inspection bound.
    let client_body_timeout = snap.validated.config.server.client_body_timeout.get();
    let mut body = ClientBody::Unread(body);
    let mut skip_rate_limit = false;
    if let Some(waf) = &snap.waf {
        if let ClientBody::Unread(b) = &body
            && waf.reads_body
            && !b.is_end_stream()
        {
            let ClientBody::Unread(b) = std::mem::replace(&mut body, ClientBody::Read(UpstreamBody::Empty)) else {
                return Ok(local_response(Reason::ClientBodyError, rec, None));
            };
            let state = Arc::new(RequestBodyState::new());
            rec.body_state = Some(state.clone());
            match Box::pin(crate::body::buffer_for_replay(
                b,
                waf.body_limit,
                snap.limits.max_body,
                state,
                client_body_timeout,
            ))
            .await
            {
                Ok(read) => body = ClientBody::Read(read),
                Err(_) => {
                    let reason = client_body_fault(rec.body_state.as_deref()).unwrap_or(Reason::ClientBodyError);
                    return Ok(local_response(reason, rec, None));
                }
            }
        }
        let (seen, more) = match &body {
            ClientBody::Read(b) => b.read_so_far(),
            ClientBody::Unread(_) => (&[][..], false),
        };
        if more && waf.overflow_blocks {
            return Ok(refuse(rec, "waf", Reason::WafBodyLimit, "body-over-inspection-limit"));
        }
        let seen = &seen[..seen.len().min(waf.body_limit)];
        let query = parts.uri.query().unwrap_or("");
        let uri = if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        };
        let view = crate::security::expr::Request {
            method: parts.method.as_str(),
            uri: &uri,
            path: &path,
            query,
            headers: &parts.headers,
            host: host_value.to_str().unwrap_or(""),
            ip: rec.client_ip,
            tls: conn.tls,
            body: seen,
            body_size: declared_length.unwrap_or(seen.len() as u64),
            body_truncated: more,
        };
        let verdict = waf.evaluate(&view);
        for (rule, action) in &verdict.matched {
            shared.metrics.waf_match(rule, action);
        }
        if let Some(block) = verdict.block {
            shared.metrics.waf_match(&block.rule, "block");
            return Ok(waf_block(rec, block));
        }
        for (rule, action) in &verdict.matched {
            rec.note(&format!("waf:{rule}={action}"));
        }
        skip_rate_limit = verdict.skip_rate_limit;
    }

    // Rate limits: the site's, then the route's. Every rule counts the request; the
    // first that refuses (outside shadow mode) answers 429.
    let now = crate::security::rate_limit::nanos_at(start.into_std());
    let mut tightest: Option<u32> = None;
    let rules = site.rate_limits.iter().chain(route.rate_limits.iter());
    for rule in rules.filter(|_| !skip_rate_limit) {
        use crate::security::rate_limit::Decision;
        match rule.check(rec.client_ip, &path, &route.id, &parts.headers, now) {
            None => {}
            Some(Decision::Allow { remaining, reset }) if tightest.is_none_or(|t| remaining < t) => {
                tightest = Some(remaining);
                *limit = Some((rule.policy.clone(), ratelimit_value(rule, remaining, reset)));
            }
            Some(Decision::Allow { .. }) => {}
            Some(Decision::Deny { .. }) if rule.shadow => {
                shared
                    .metrics
                    .security("rate_limit", Reason::RateLimited.as_str(), "log");
                rec.note(&format!("rate_limit:{}=log", rule.name));
            }
            Some(Decision::Deny { retry_after, reset }) => {
                *limit = Some((rule.policy.clone(), ratelimit_value(rule, 0, reset)));
                let rule_name = rule.name.to_string();
                let mut resp = refuse(rec, "rate_limit", Reason::RateLimited, &rule_name);
                let secs = retry_after.div_ceil(1_000_000_000).max(1);
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                return Ok(resp);
            }
        }
    }

    let cache_view = caching::View {
        shared,
        snap,
        tls: conn.tls,
        host: &host_value,
        path: &path,
        query: parts.uri.query(),
        method: &parts.method,
    };
    let Some(route_pool) = &route.pool else {
        let chain = route.chain.clone();
        let Some(chain) = chain else {
            return Ok(local_response(Reason::NoAvailableBackend, rec, None));
        };
        let pq = rewrite_path(&path, parts.uri.query(), &route.rewrite, matched);
        let (mut h, _) = upstream_headers(
            parts.headers,
            false,
            None,
            conn,
            trusted_peer,
            &host_value,
            snap.via.then_some(parts.version),
            &rec.request_id,
            false,
        );
        let cached = cache_stage!(
            route,
            &cache_view,
            &pq,
            caching::RefreshVia::Chain(chain.clone()),
            h,
            rec
        );
        let target = ChainTarget {
            chain: &chain,
            method: &parts.method,
            path_and_query: &pq,
            tls: conn.tls,
            host: &host_value,
        };
        // Boxed, like the other rarely taken stages, to keep the pipeline's future small.
        return Ok(Box::pin(serve_chain(shared, snap, rec, target, h, body, explain, cached)).await);
    };
    // A pool with no healthy backend hands over to its fallback pool, if it has one.
    let (pool, fallback) = match &route.fallback {
        Some(f) if !route_pool.has_healthy() => (f, true),
        _ => (route_pool, false),
    };
    rec.pool = Some(fallback);
    let policy = &pool.retry;
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    // Never retry an upgrade (the tunnel cannot be replayed) or, unless the route
    // opts in, a non-idempotent method.
    let may_retry = policy.retries > 0 && upgrade.is_none() && (idempotent || route.retry_non_idempotent);
    policy.note_request(start.into_std());

    let pq = rewrite_path(&path, parts.uri.query(), &route.rewrite, matched);
    // The fields the proxy sets wait until the send, unless a stage before it may
    // read them (the cache's variants, balancing or pinning on a header).
    let defer = route.cache.is_none() && !pool.reads_request_fields();
    let (mut h, added) = upstream_headers(
        parts.headers,
        pool.protocol == Protocol::Http2,
        upgrade.as_ref(),
        conn,
        trusted_peer,
        &host_value,
        snap.via.then_some(parts.version),
        &rec.request_id,
        defer,
    );

    if h2_websocket {
        // The HTTP/1.1 handshake the upstream expects (RFC 6455 §4.1); the key only
        // has to be fresh, nobody checks the answer to it over HTTP/2.
        h.insert(header::SEC_WEBSOCKET_KEY, websocket_key());
        if !h.contains_key(header::SEC_WEBSOCKET_VERSION) {
            h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
    }

    // The request body: streamed as it arrives, or, when a retry may need it again,
    // kept in memory up to the replay limit (past it, it streams and is not retried).
    let mut body = match body {
        // Already read for the WAF (whole, or a prefix and the rest streaming).
        ClientBody::Read(b) => Some(b),
        // Whole already (its head's one `Content-Length` says how long, perhaps 0),
        // and within the limit (that length was checked above). Past the replay
        // bound it is not retried, as it would not be had it streamed in.
        ClientBody::Unread(ClientIn::Full(b))
            if !may_retry || b.as_ref().is_none_or(|b| b.len() <= policy.replay_limit) =>
        {
            rec.body_whole = b.as_ref().map_or(0, |b| b.len() as u64);
            Some(UpstreamBody::Full(b))
        }
        ClientBody::Unread(body) if body.is_end_stream() => Some(UpstreamBody::Empty),
        ClientBody::Unread(body) => {
            let state = Arc::new(RequestBodyState::new());
            rec.body_state = Some(state.clone());
            // A small body of known length (an HTTP/2 request's, or an HTTP/1 one the
            // lean server did not get whole in time) is read whole first, as nginx
            // does: it then goes behind its head in one write through the own client.
            let small = body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= crate::body::SMALL_BODY as u64);
            if may_retry || small {
                let keep = if may_retry {
                    policy.replay_limit
                } else {
                    crate::body::SMALL_BODY
                };
                match Box::pin(crate::body::buffer_for_replay(
                    body,
                    keep,
                    snap.limits.max_body,
                    state,
                    client_body_timeout,
                ))
                .await
                {
                    Ok(b) => Some(b),
                    Err(_) => {
                        let reason = client_body_fault(rec.body_state.as_deref()).unwrap_or(Reason::ClientBodyError);
                        return Ok(local_response(reason, rec, None));
                    }
                }
            } else {
                Some(UpstreamBody::stream(
                    body,
                    snap.limits.max_body,
                    state,
                    client_body_timeout,
                ))
            }
        }
    };
    let replayable = |b: &Option<UpstreamBody>| matches!(b, Some(UpstreamBody::Empty | UpstreamBody::Full(_)));

    let t = &pool.timeouts;
    let deadline = (!t.request.is_zero()).then(|| start + t.request.get());
    let header_limit = policy
        .per_try_timeout
        .map_or(t.response_header.get(), |p| p.min(t.response_header.get()));
    // HTTP cache: answer from a usable stored response, or prepare to validate a
    // stale one, before any upstream is contacted.
    let cached = cache_stage!(
        route,
        &cache_view,
        &pq,
        caching::RefreshVia::Pool(pool.clone(), route.host_for_refresh(&host_value)),
        h,
        rec
    );
    // An HTTP/2 WebSocket CONNECT goes upstream as an HTTP/1.1 GET with Upgrade.
    let request_method = if h2_websocket {
        Method::GET
    } else {
        parts.method.clone()
    };

    // The upstream target: the client's own bytes when normalisation and rewriting
    // changed nothing (shared, not copied or parsed again), else the new text.
    let upstream_pq = match parts.uri.path_and_query() {
        Some(orig) if orig.as_str() == pq => Some(orig.clone()),
        _ => http::uri::PathAndQuery::try_from(&*pq).ok(),
    };
    let host_in_map = h.contains_key(header::HOST);
    let (pinned, repin) = pool.pinned(&h, rec.client_ip);
    // Backends tried, in order: inline (a heap allocation per request otherwise).
    let mut tried: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
    let (backend, resp) = loop {
        let picked = match pinned.filter(|_| tried.is_empty()) {
            Some(i) => pool.backends.get(i).map(|b| (i, b)),
            None => pool.pick_avoiding(&parts.uri, &h, rec.client_ip, &tried),
        };
        let Some((index, backend)) = picked else {
            return Ok(local_response(Reason::NoAvailableBackend, rec, None));
        };
        tried.push(index);
        rec.upstream = Served::Backend(index);
        rec.in_flight = Some(backend.state.start());
        let Some(pq_sent) = upstream_pq.as_ref() else {
            return Ok(local_response(Reason::BadRequest, rec, None));
        };
        let can_retry_after = |tries: usize, body: &Option<UpstreamBody>| {
            may_retry
                && tries <= policy.retries as usize
                && replayable(body)
                && deadline.is_none_or(|d| Instant::now() < d)
        };
        let this_body = match &mut body {
            Some(UpstreamBody::Full(b)) => UpstreamBody::Full(b.clone()),
            Some(UpstreamBody::Empty) => UpstreamBody::Empty,
            other => other.take().unwrap_or(UpstreamBody::Empty),
        };
        let mut up = Request::new(this_body);
        *up.method_mut() = request_method.clone();
        *up.version_mut() = match pool.protocol {
            Protocol::Http1 => Version::HTTP_11,
            Protocol::Http2 => Version::HTTP_2,
        };
        // A preserved Host that is in the map already (the client's own) stays as it is.
        if !(host_in_map && matches!(route.host, HostMode::Preserve)) {
            h.insert(header::HOST, upstream_host(&route.host, &host_value, backend));
        }
        // Rampart's own HTTP/1 client (body-less GET and HEAD, and requests whose
        // body is held whole, to plain HTTP) encodes the headers where they are;
        // hyper's client takes them, so a request that may be retried gives it a copy.
        let whole = match up.body() {
            UpstreamBody::Full(Some(b)) => Some(b),
            _ => None,
        };
        let own = pool.h1.is_some()
            && backend.target.scheme() == Some(&http::uri::Scheme::HTTP)
            && match whole {
                Some(b) => crate::h1client::eligible_with_body(up.method(), up.version(), &h, b.len()),
                None if lean_head => {
                    crate::h1client::eligible_without_fields(up.method(), up.version(), !up.body().is_end_stream())
                }
                None => crate::h1client::eligible(up.method(), up.version(), &h, !up.body().is_end_stream()),
            };
        // The own client's head: the map's fields, then the deferred ones; then the body.
        let own_head = own.then(|| {
            let added = added.iter().flat_map(Added::fields);
            crate::h1client::encode(
                up.method(),
                pq_sent.as_str(),
                &h,
                added,
                whole.map_or(&[][..], |b| &b[..]),
            )
        });
        if !own {
            // hyper's HTTP/1 pool sends origin-form and connects to the backend's
            // target; hyper-util's client takes the absolute form. (The own client
            // needs no URI: the head above has the target.)
            let mut target = http::uri::Parts::default();
            target.path_and_query = Some(pq_sent.clone());
            if pool.h1.is_none() {
                target.scheme = Some(backend.scheme.clone());
                target.authority = Some(backend.authority.clone());
            }
            match Uri::from_parts(target) {
                Ok(u) => *up.uri_mut() = u,
                Err(_) => return Ok(local_response(Reason::BadRequest, rec, None)),
            }
            *up.headers_mut() = if can_retry_after(tried.len(), &body) {
                h.clone()
            } else {
                std::mem::take(&mut h)
            };
            if let Some(a) = &added {
                a.insert_into(up.headers_mut());
            }
        }

        // The response-header timeout runs from the last progress of the request body
        // (a long, steady upload is not a timeout; an upstream that stops reading it
        // is); the whole-request deadline runs from the start.
        // A body-less request's first attempt goes out as the pipeline reaches it:
        // its start stands in for the send time (one clock read fewer). Not after a
        // cache stage, which may have waited on another request's fetch.
        let sent_at = if tried.len() == 1 && rec.body_state.is_none() && route.cache.is_none() {
            start
        } else {
            Instant::now()
        };
        // Without a request body the timeout is one deadline: the caller's timer, when
        // it lends one, is moved to it (no timer made and dropped per request).
        let header_timer = match timer.as_mut() {
            Some(t) if rec.body_state.is_none() => {
                t.set(sent_at + header_limit);
                futures_util::future::Either::Left(t.expired())
            }
            _ => futures_util::future::Either::Right(header_timeout(rec.body_state.clone(), sent_at, header_limit)),
        };
        let deadline_timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        // In order: an answer that is in wins over a timer that fired with it (and no
        // random start to draw per poll).
        let result = tokio::select! {
            biased;
            r = send_upstream(pool, index, backend, up, own_head.map(|head| crate::h1pool::Own {
                head,
                passthrough,
                now: sent_at.into_std(),
            })) => match r {
                Ok((resp, checkin)) => {
                    rec.checkin = checkin;
                    Ok(resp)
                }
                Err((r, e)) => Err(client_body_fault(rec.body_state.as_deref()).unwrap_or_else(|| {
                    tracing::debug!(error = %e, reason = r.as_str(), upstream = %backend.label, "upstream request failed");
                    r
                })),
            },
            _ = header_timer => Err(client_body_fault(rec.body_state.as_deref()).unwrap_or(Reason::UpstreamHeaderTimeout)),
            _ = deadline_timer => Err(Reason::UpstreamRequestTimeout),
        };
        let retry = match &result {
            Ok(resp) => policy.retries_status(resp.status().as_u16()),
            Err(reason) => policy.retries_reason(*reason),
        };
        let outcome = match &result {
            Ok(resp) => Outcome::Status(resp.status().as_u16()),
            Err(reason) => Outcome::Failed(*reason),
        };
        if retry && can_retry_after(tried.len(), &body) && policy.take_retry() {
            // This attempt failed and another may succeed: count it against the backend
            // and try again, on another backend when there is one.
            let reason = result.as_ref().err().copied();
            if let Some(r) = reason {
                pool.metrics.upstream_error(r);
            }
            pool.metrics.retries.inc();
            // A retried response is dropped unread: its connection is not reusable.
            rec.checkin = None;
            rec.report_backend_result(false, Instant::now());
            rec.note_attempt(&pool.name, index, outcome, explain);
            continue;
        }
        let success = result.as_ref().is_ok_and(|r| r.status().as_u16() < 500);
        rec.note_attempt(
            &pool.name,
            index,
            if success { Outcome::Success } else { outcome },
            explain,
        );
        match result {
            Ok(resp) => break (backend, resp),
            Err(reason) => {
                if reason.is_upstream_error() {
                    pool.metrics.upstream_error(reason);
                    // The origin failed: a stale stored response may stand in (RFC 5861).
                    if let Some(c) = &cached
                        && let Some(e) = c.stale_on_error()
                    {
                        return Ok(c.answer_stale(&e, &request_method, rec, snap.via));
                    }
                }
                return Ok(local_response(reason, rec, None));
            }
        }
    };

    let (mut rparts, rbody) = resp.into_parts();
    if let Err(detail) = crate::security::framing::check_response(&rparts.headers) {
        pool.metrics.upstream_error(Reason::UpstreamBadFraming);
        return Ok(refuse(rec, "framing", Reason::UpstreamBadFraming, detail));
    }
    rec.status = rparts.status.as_u16();
    // Pin (or re-pin) the client to the backend that served it.
    if let Some(a) = &pool.affinity
        && (repin || pinned != tried.last().copied())
        && a.mode == rampart_config::AffinityMode::Cookie
        && let Some(v) = a.set_cookie(backend.affinity_id)
    {
        rparts.headers.append(header::SET_COOKIE, v);
    }

    if rparts.status == StatusCode::SWITCHING_PROTOCOLS {
        // The upstream connection becomes the tunnel's: never back to the pool.
        rec.checkin = None;
        let (Some(client_upgrade), Some(_)) = (client_upgrade, upgrade) else {
            // A 101 nobody asked for cannot be relayed.
            pool.metrics.upstream_error(Reason::UpstreamInvalidResponse);
            return Ok(local_response(Reason::UpstreamInvalidResponse, rec, None));
        };
        let route_tunnel_idle = route.tunnel_idle;
        let mut upstream_resp = Response::from_parts(rparts.clone(), ());
        let upstream_upgrade = hyper::upgrade::on(&mut upstream_resp);
        // The tunnel outlives its HTTP connection: count it, so shutdown waits for it.
        let guard = crate::listener::ConnTracker::enter(shared, shared.metrics.open_tunnels.clone());
        tokio::spawn(async move {
            tunnel(client_upgrade, upstream_upgrade, route_tunnel_idle).await;
            drop(guard);
        });
        let proto = rparts.headers.get(header::UPGRADE).cloned();
        headers::remove_hop_by_hop(&mut rparts.headers, false);
        if h2_websocket {
            // Over HTTP/2 the tunnel opens with a 2xx to the CONNECT (RFC 8441 §5).
            rparts.status = StatusCode::OK;
            rparts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        } else {
            rparts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(p) = proto {
                rparts.headers.insert(header::UPGRADE, p);
            }
        }
        finish_headers(&mut rparts.headers, &rec, snap.via, explain, route, backend);
        return Ok(Response::from_parts(rparts, EdgeBody::empty().on_complete(rec)));
    }

    let mut fill = None;
    let mut rbody = rbody;
    if let Some(ctx) = cached {
        let fetched = caching::Fetched {
            shared,
            method: &request_method,
            tls: conn.tls,
            host: &host_value,
            body_idle: t.body_idle.get(),
            deadline,
            via: snap.via,
        };
        match Box::pin(caching::after(fetched, ctx, &mut rparts, rbody, rec)).await {
            Ok((b, f, r)) => (rbody, fill, rec) = (b, f, r),
            Err(answer) => return Ok(answer),
        }
    }
    let present = headers::fields_present(&rparts.headers);
    headers::remove_hop_by_hop_present(&mut rparts.headers, false, present);
    // With passed-through lines (no explaining, see above) and no upstream `Via` or
    // `x-request-id` to combine or replace, the proxy's two ride along with the lines
    // instead of going into the map.
    let lines = match rbody.passthrough_mut() {
        Some(p) if present & (headers::FIELD_VIA | headers::FIELD_X_REQUEST_ID) == 0 => Some(p),
        _ => None,
    };
    match lines {
        Some(lines) => {
            let via = snap.via.then(|| headers::via_value(Version::HTTP_11));
            lines.add_own(via, rec.request_id.clone());
        }
        None => finish_headers(&mut rparts.headers, &rec, snap.via, explain, route, backend),
    }
    rparts.version = Version::HTTP_11;
    let mut body = EdgeBody::upstream(rbody, t.body_idle.get(), deadline);
    if let Some(f) = fill {
        body = body.fill(f);
    }
    Ok(Response::from_parts(rparts, body.on_complete(rec)))
}

/// Send one attempt to backend `index`: through the pool's HTTP/1 connections, or
/// hyper-util's client for HTTP/2. An error comes with its reason code and text.
async fn send_upstream(
    pool: &Arc<crate::upstream::Pool>,
    index: usize,
    backend: &Backend,
    up: Request<UpstreamBody>,
    own: Option<crate::h1pool::Own>,
) -> Result<(Response<crate::body::UpBody>, Option<crate::h1pool::Checkin>), (Reason, String)> {
    match &pool.h1 {
        Some(h1) => match h1.send(pool, index, &backend.target, up, own).await {
            Ok((resp, checkin)) => Ok((resp, checkin)),
            Err(e) => Err((crate::upstream::classify_send(&e), format!("{e:?}"))),
        },
        None => match pool.client.get().request(up).await {
            Ok(resp) => Ok((resp.map(crate::body::UpBody::Hyper), None)),
            Err(e) => Err((classify(&e), format!("{e:?}"))),
        },
    }
}

/// The request headers sent upstream: hop-by-hop removed (an upgrade's kept),
/// `X-Forwarded-*`, `Via` (when `via` is set) and `x-request-id`. Host is set per attempt.
///
/// For a peer that is not a trusted proxy the client's own copies are taken out and
/// the proxy's values are [`Added`]. With `defer` they are not put in the map but
/// come back, for the own client to write after the map's fields (or hyper's request
/// to get them just before it is sent); nothing between here and the send may read
/// them then (the caller checks: no cache, no balancing or pinning on a header).
#[allow(clippy::too_many_arguments)]
fn upstream_headers<'a>(
    mut h: http::HeaderMap,
    keep_te_trailers: bool,
    upgrade: Option<&HeaderValue>,
    conn: &'a ConnInfo,
    trusted_peer: bool,
    host: &'a HeaderValue,
    via: Option<Version>,
    request_id: &RequestId,
    defer: bool,
) -> (http::HeaderMap, Option<Added<'a>>) {
    let present = headers::fields_present(&h);
    headers::remove_hop_by_hop_present(&mut h, keep_te_trailers, present);
    if let Some(proto) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, proto.clone());
    }
    if !trusted_peer {
        // The client's own copies never go upstream (its Via is added to).
        for (bit, name) in [
            (headers::FIELD_X_FORWARDED_FOR, &X_FORWARDED_FOR),
            (headers::FIELD_X_FORWARDED_PROTO, &X_FORWARDED_PROTO),
            (headers::FIELD_X_FORWARDED_HOST, &X_FORWARDED_HOST),
            (headers::FIELD_X_REQUEST_ID, &X_REQUEST_ID),
        ] {
            if present & bit != 0 {
                h.remove(name);
            }
        }
        let via = via.map(|v| {
            if present & headers::FIELD_VIA == 0 {
                return headers::via_value(v);
            }
            let ours = headers::via_entry(v);
            let prior: Vec<HeaderValue> = match h.entry(header::VIA) {
                http::header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
                http::header::Entry::Vacant(_) => Vec::new(),
            };
            headers::via_after(&prior, ours)
        });
        let added = Added {
            forwarded_for: &conn.peer_value,
            forwarded_proto: headers::proto_value(conn.tls),
            forwarded_host: host,
            via,
            request_id: request_id.clone(),
        };
        if defer {
            return (h, Some(added));
        }
        added.insert_into(&mut h);
        return (h, None);
    }
    // A trusted proxy's values stand and are added to. X-Forwarded-For, -Proto,
    // -Host, Via and x-request-id: room for all five at once, rather than the map
    // growing as they are added.
    h.reserve(5);
    headers::set_forwarded(&mut h, &conn.peer_value, true, conn.tls, Some(host));
    if let Some(v) = via {
        headers::append_via(&mut h, v);
    }
    h.insert(X_REQUEST_ID.clone(), request_id.header_value());
    (h, None)
}

static VIA: header::HeaderName = header::VIA;

/// The fields the proxy sets on a request from a peer that is not a trusted proxy:
/// written after the map's fields when the head is encoded, or put in the map (at
/// once, or just before hyper's client takes the request; see [`upstream_headers`]).
/// The peer's address and the host are borrowed: no reference counts to move.
struct Added<'a> {
    forwarded_for: &'a HeaderValue,
    forwarded_proto: HeaderValue,
    forwarded_host: &'a HeaderValue,
    via: Option<HeaderValue>,
    request_id: RequestId,
}

impl Added<'_> {
    /// The fields held as header values, in the order they are sent (`x-request-id`
    /// follows them).
    fn header_fields(&self) -> impl Iterator<Item = (&'static header::HeaderName, &HeaderValue)> {
        [
            (&X_FORWARDED_FOR, Some(self.forwarded_for)),
            (&X_FORWARDED_PROTO, Some(&self.forwarded_proto)),
            (&X_FORWARDED_HOST, Some(self.forwarded_host)),
            (&VIA, self.via.as_ref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
    }

    /// All the fields in the order they are sent, as bytes (for the own client's head).
    fn fields(&self) -> impl Iterator<Item = (&'static header::HeaderName, &[u8])> {
        self.header_fields()
            .map(|(k, v)| (k, v.as_bytes()))
            .chain(std::iter::once((&X_REQUEST_ID, self.request_id.as_bytes())))
    }

    /// Put them in `h` (a request for hyper's client).
    fn insert_into(&self, h: &mut http::HeaderMap) {
        h.reserve(5);
        for (k, v) in self.header_fields() {
            h.insert(k, v.clone());
        }
        h.insert(&X_REQUEST_ID, self.request_id.header_value());
    }
}

/// Serve a route whose target is a provider chain.
#[allow(clippy::too_many_arguments)]
/// Where a chain route sends a request.
struct ChainTarget<'a> {
    chain: &'a crate::chain::Chain,
    method: &'a Method,
    path_and_query: &'a str,
    tls: bool,
    host: &'a HeaderValue,
}

#[allow(clippy::too_many_arguments)]
async fn serve_chain(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    mut rec: Rec,
    target: ChainTarget<'_>,
    h: http::HeaderMap,
    body: ClientBody,
    explain: bool,
    cached: Option<caching::CacheCtx>,
) -> Response<EdgeBody> {
    let ChainTarget {
        chain,
        method,
        path_and_query,
        ..
    } = target;
    // Keep the body for failover up to the chain's replay bound.
    let body = match body {
        ClientBody::Read(b) => b,
        ClientBody::Unread(body) if body.is_end_stream() => UpstreamBody::Empty,
        ClientBody::Unread(body) => {
            let state = Arc::new(RequestBodyState::new());
            rec.body_state = Some(state.clone());
            match crate::body::buffer_for_replay(
                body,
                chain.replay_limit,
                snap.limits.max_body,
                state,
                snap.validated.config.server.client_body_timeout.get(),
            )
            .await
            {
                Ok(b) => b,
                Err(_) => {
                    let reason = client_body_fault(rec.body_state.as_deref()).unwrap_or(Reason::ClientBodyError);
                    return local_response(reason, rec, None);
                }
            }
        }
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let session = h
        .get("x-rampart-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let request_id = rec.request_id.as_str().to_string();
    let req = crate::chain::ChainRequest {
        method,
        path,
        query,
        headers: &h,
        session: session.as_deref(),
        request_id: &request_id,
        deadline: None,
    };
    let result = crate::chain::forward(chain, &shared.chain_health, &req, body).await;
    let trace = result.trace;
    rec.tries = u32::try_from(trace.attempts.len()).unwrap_or(u32::MAX);
    rec.upstream = trace
        .provider
        .as_deref()
        .map_or(Served::Nobody, |p| Served::Provider(Arc::from(p)));
    rec.reason_text = Some(trace.reason);
    shared.control.observe(chain, &trace);
    shared.traces.push(trace.clone());

    let security = rec.detail.clone();
    let explain_headers = |h: &mut http::HeaderMap| {
        if !explain {
            return;
        }
        if let Some(v) = security.as_deref().and_then(|d| HeaderValue::from_str(d).ok()) {
            h.insert(X_RAMPART_SECURITY.clone(), v);
        }
        let mut put = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(header::HeaderName::from_static(name), v);
            }
        };
        if let Some(p) = &trace.provider {
            put("x-rampart-provider", p.clone());
        }
        put("x-rampart-reason", trace.reason.to_string());
        put("x-rampart-attempts", trace.attempts_header());
        put("x-rampart-failure-points", trace.failure_points_header());
        put("x-rampart-route-trace", trace.encoded());
    };

    let Some(resp) = result.response else {
        // Every provider failed: a stale stored response may stand in (RFC 5861).
        if let Some(c) = &cached
            && let Some(e) = c.stale_on_error()
        {
            let mut answer = c.answer_stale(&e, method, rec, snap.via);
            explain_headers(answer.headers_mut());
            return answer;
        }
        // The policy allows no (working) fallback: fail closed.
        let status = if trace.selected_fallback == "origin" {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::json!({
            "status": status.as_u16(),
            "reason": trace.reason,
            "policy": trace.policy_id,
            "route_key": trace.route_key,
            "selected_fallback": trace.selected_fallback,
            "failure_points": trace.failure_points_header(),
            "request_id": request_id,
        });
        let mut resp = Response::new(EdgeBody::empty());
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(X_REQUEST_ID.clone(), rec.request_id.header_value());
        if let Ok(v) = HeaderValue::from_str(trace.reason) {
            h.insert(X_RAMPART_REASON.clone(), v);
        }
        explain_headers(h);
        rec.status = status.as_u16();
        let is_head = *method == Method::HEAD;
        let body = if is_head {
            EdgeBody::empty()
        } else {
            EdgeBody::full(format!("{body}\n"))
        };
        *resp.body_mut() = body.on_complete(rec);
        return resp;
    };
    let (mut rparts, rbody) = resp.into_parts();
    let mut rbody = crate::body::UpBody::Hyper(rbody);
    if let Err(detail) = crate::security::framing::check_response(&rparts.headers) {
        let mut answer = refuse(rec, "framing", Reason::UpstreamBadFraming, detail);
        explain_headers(answer.headers_mut());
        return answer;
    }
    rec.status = rparts.status.as_u16();
    let mut fill = None;
    if let Some(ctx) = cached {
        let fetched = caching::Fetched {
            shared,
            method,
            tls: target.tls,
            host: target.host,
            body_idle: CHAIN_BODY_IDLE,
            deadline: None,
            via: snap.via,
        };
        match Box::pin(caching::after(fetched, ctx, &mut rparts, rbody, rec)).await {
            Ok((b, f, r)) => (rbody, fill, rec) = (b, f, r),
            Err(mut answer) => {
                explain_headers(answer.headers_mut());
                return answer;
            }
        }
    }
    headers::remove_hop_by_hop(&mut rparts.headers, false);
    if snap.via {
        headers::append_via(&mut rparts.headers, Version::HTTP_11);
    }
    rparts
        .headers
        .insert(X_REQUEST_ID.clone(), rec.request_id.header_value());
    explain_headers(&mut rparts.headers);
    rparts.version = Version::HTTP_11;
    let mut body = EdgeBody::upstream(rbody, CHAIN_BODY_IDLE, None);
    if let Some(f) = fill {
        body = body.fill(f);
    }
    Response::from_parts(rparts, body.on_complete(rec))
}

/// Longest pause allowed in a provider's response body.
const CHAIN_BODY_IDLE: Duration = Duration::from_secs(60);

/// When the exchange failed because of the client's body, say so (413/400/408)
/// rather than blaming the upstream.
fn client_body_fault(state: Option<&RequestBodyState>) -> Option<Reason> {
    let s = state?;
    if s.too_large.load(Ordering::Relaxed) {
        Some(Reason::RequestBodyTooLarge)
    } else if s.timed_out.load(Ordering::Relaxed) {
        Some(Reason::ClientBodyTimeout)
    } else if s.client_error.load(Ordering::Relaxed) {
        Some(Reason::ClientBodyError)
    } else {
        None
    }
}

/// Resolves when `timeout` has passed since the request body last made progress
/// (or since `sent_at`, for requests without a body).
async fn header_timeout(body: Option<Arc<RequestBodyState>>, sent_at: Instant, timeout: Duration) {
    // No clock read here: the timer fires at the deadline, and only then is the
    // body's progress looked at (a later deadline if it moved).
    let mut at = sent_at + timeout;
    loop {
        tokio::time::sleep_until(at).await;
        let base = body.as_ref().map_or(sent_at, |b| b.last_progress().max(sent_at));
        if base + timeout <= at {
            return;
        }
        at = base + timeout;
    }
}

fn finish_headers(
    h: &mut http::HeaderMap,
    rec: &Record,
    via: bool,
    explain: bool,
    route: &RouteEntry,
    backend: &Backend,
) {
    // Via and x-request-id (and the explain headers): one growth of the map at most.
    h.reserve(if explain { 7 } else { 2 });
    if via {
        headers::append_via(h, Version::HTTP_11);
    }
    h.insert(X_REQUEST_ID.clone(), rec.request_id.header_value());
    if explain {
        if let Ok(v) = HeaderValue::from_str(&route.id) {
            h.insert(X_RAMPART_ROUTE.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(&backend.label) {
            h.insert(X_RAMPART_UPSTREAM.clone(), v);
        }
        h.insert(
            X_RAMPART_REASON.clone(),
            HeaderValue::from_static(Reason::Proxied.as_str()),
        );
        if let Some(a) = rec.attempts.as_deref().and_then(|a| HeaderValue::from_str(a).ok()) {
            h.insert(X_RAMPART_ATTEMPTS.clone(), a);
        }
        security_header(h, rec);
    }
}

static X_RAMPART_SECURITY: header::HeaderName = header::HeaderName::from_static("x-rampart-security");

/// `x-rampart-security`: the security decisions that let the request through
/// (`waf:RULE=log`, `rate_limit:NAME=log`, ...), for explaining sites.
fn security_header(h: &mut http::HeaderMap, rec: &Record) {
    if let Some(v) = rec.detail.as_deref().and_then(|d| HeaderValue::from_str(d).ok()) {
        h.insert(X_RAMPART_SECURITY.clone(), v);
    }
}

fn upstream_host(mode: &HostMode, client_host: &HeaderValue, backend: &Backend) -> HeaderValue {
    match mode {
        HostMode::Preserve => client_host.clone(),
        HostMode::Backend => backend.host_value.clone(),
        HostMode::Fixed(v) => v.clone(),
    }
}

/// The path and query sent upstream, after any prefix strip or rewrite.
///
/// A prefix ending in `/` matched whole segments, so what follows it is joined to
/// the replacement with exactly one `/` (`/api/` → `/v2`: `/api/users` becomes
/// `/v2/users`). A prefix without a trailing `/` is replaced literally, as nginx
/// does (`/x` → `/y`: `/xyz` becomes `/yyz`). With nothing to rewrite and no
/// query, it is `path` itself, not a copy.
fn rewrite_path<'a>(
    path: &'a str,
    query: Option<&str>,
    rewrite: &Rewrite,
    matched: Matched<'_>,
) -> std::borrow::Cow<'a, str> {
    let new_path: std::borrow::Cow<'a, str> = match (rewrite, matched) {
        (Rewrite::Strip, Matched::Prefix(p)) => join("/", &path[p.len().min(path.len())..], p.ends_with('/')).into(),
        (Rewrite::Replace(with), Matched::Prefix(p)) => {
            join(with, &path[p.len().min(path.len())..], p.ends_with('/')).into()
        }
        _ => path.into(),
    };
    match query {
        Some(q) => format!("{new_path}?{q}").into(),
        None => new_path,
    }
}

fn join(base: &str, rest: &str, segment: bool) -> String {
    if rest.is_empty() {
        return base.to_string();
    }
    let rest_trim = rest.strip_prefix('/').unwrap_or(rest);
    if segment || base.ends_with('/') || rest.starts_with('/') {
        format!("{}/{rest_trim}", base.trim_end_matches('/'))
    } else {
        format!("{base}{rest}")
    }
}

/// A fresh `Sec-WebSocket-Key`: the base64 of 16 random bytes (21 random characters,
/// one whose low four bits are zero, and the padding).
fn websocket_key() -> HeaderValue {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut key: String = (0..21).map(|_| char::from(A[fastrand::usize(..64)])).collect();
    key.push(char::from(b"AQgw"[fastrand::usize(..4)]));
    key.push_str("==");
    HeaderValue::from_str(&key).unwrap_or(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="))
}

/// Relay an upgraded connection both ways until either side closes or it is idle too long.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, idle: Duration) {
    let (c, u) = tokio::join!(client, upstream);
    let (Ok(c), Ok(u)) = (c, u) else {
        tracing::debug!("upgrade failed on one side; tunnel not opened");
        return;
    };
    let activity = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let epoch = Instant::now();
    let mut c = Activity {
        io: TokioIo::new(c),
        last: activity.clone(),
        epoch,
    };
    let mut u = Activity {
        io: TokioIo::new(u),
        last: activity.clone(),
        epoch,
    };
    let copy = tokio::io::copy_bidirectional(&mut c, &mut u);
    tokio::pin!(copy);
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let wake = epoch + last + idle;
        tokio::select! {
            _ = &mut copy => return,
            _ = tokio::time::sleep_until(wake) => {
                let now_last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if now_last == last {
                    tracing::debug!("tunnel idle timeout");
                    return;
                }
            }
        }
    }
}

/// Records the time of the last byte read, for the tunnel's idle timeout.
struct Activity<T> {
    io: T,
    last: Arc<std::sync::atomic::AtomicU64>,
    epoch: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

crate::io::delegate_write!(Activity, io);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_value_is_the_address_as_text() {
        for peer in [
            "203.0.113.7:1",
            "0.0.0.0:1",
            "255.255.255.255:1",
            "[2001:db8::1]:1",
            "[::ffff:192.0.2.1]:1",
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            let info = ConnInfo::new(peer, false);
            assert_eq!(info.peer_value.to_str().unwrap(), peer.ip().to_string());
        }
    }

    #[test]
    fn the_per_connection_service_future_is_small() {
        // hyper keeps an allocation of this size per HTTP/1 connection, idle or not.
        fn future_size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<Shared>, Arc<ConnInfo>, Request<ClientIn>) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = future_size(handle);
        assert!(size <= 512, "handle's future is {size} bytes");
    }

    #[test]
    fn the_per_request_pipeline_future_size() {
        fn future_size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(
                &'static Arc<Shared>,
                &'static ConnInfo,
                Request<ClientIn>,
                &'static mut Option<(HeaderValue, HeaderValue)>,
                bool,
                Option<&'static mut crate::timer::LazyTimer>,
                Option<&'static Arc<Snapshot>>,
            ) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        // Held in the connection's task while a request is served (the lean HTTP/1
        // server) or boxed once per request (hyper's). Rarely taken stages (cache,
        // chain, WAF body reads, replay buffering) are boxed inside it so this stays
        // small; the upstream exchange, taken by every request, is not (boxing it
        // copied its 1.5 KiB into the box per request).
        let size = future_size(handle_request);
        println!("handle_request's future is {size} bytes");
        assert!(size <= 5120, "handle_request's future is {size} bytes");
    }

    #[test]
    fn rewrites() {
        let r =
            |p: &str, q: Option<&str>, rw: &Rewrite, m: &str| rewrite_path(p, q, rw, Matched::Prefix(m)).into_owned();
        let strip = Rewrite::Strip;
        let v2 = Rewrite::Replace("/v2".into());
        let v2s = Rewrite::Replace("/v2/".into());
        assert_eq!(r("/api/users", Some("x=1"), &strip, "/api"), "/users?x=1");
        assert_eq!(r("/api/users", None, &strip, "/api/"), "/users");
        assert_eq!(r("/api", None, &strip, "/api"), "/");
        assert_eq!(r("/api/", None, &strip, "/api/"), "/");
        assert_eq!(
            r("/xyz", None, &strip, "/x"),
            "/yz",
            "literal for a prefix without a slash"
        );
        assert_eq!(r("/api/users", Some("x=1"), &v2s, "/api/"), "/v2/users?x=1");
        assert_eq!(
            r("/api/users", None, &v2, "/api/"),
            "/v2/users",
            "one slash between segments"
        );
        assert_eq!(r("/api/users", None, &v2, "/api"), "/v2/users");
        assert_eq!(r("/api/", None, &v2s, "/api/"), "/v2/");
        // Nothing to rewrite: the path itself, not a copy, when there is no query.
        let plain = rewrite_path("/a/b", None, &Rewrite::None, Matched::Prefix("/"));
        assert!(matches!(plain, std::borrow::Cow::Borrowed("/a/b")));
        assert_eq!(
            rewrite_path("/a/b", Some("x=1"), &Rewrite::None, Matched::Prefix("/")),
            "/a/b?x=1"
        );
        assert_eq!(r("/xyz", None, &Rewrite::Replace("/y".into()), "/x"), "/yyz");
        assert_eq!(r("/api/users", Some("x=1"), &Rewrite::None, "/api"), "/api/users?x=1");
    }
}
