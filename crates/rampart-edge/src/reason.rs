//! Reason codes: why the edge answered the way it did. They appear in the
//! `x-rampart-reason` header, the access log and the metrics.

use http::StatusCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The upstream answered; nothing to explain.
    Proxied,
    NoMatchingSite,
    NoMatchingRoute,
    HttpsRedirect,
    UriTooLong,
    HeadersTooLarge,
    RequestBodyTooLarge,
    BadRequest,
    MethodNotAllowed,
    NoAvailableBackend,
    UpstreamConnectRefused,
    UpstreamConnectTimeout,
    UpstreamConnectError,
    UpstreamDnsError,
    UpstreamTlsError,
    UpstreamReset,
    UpstreamInvalidResponse,
    UpstreamHeaderTimeout,
    UpstreamRequestTimeout,
    UpstreamBodyIdleTimeout,
    UpstreamBodyError,
    ClientBodyError,
    ClientBodyTimeout,
    OnlyIfCachedMiss,
    PurgeNotAllowed,
    /// Ambiguous request framing (Content-Length with Transfer-Encoding, a coding
    /// other than one final `chunked`).
    BadFraming,
    /// Several Host fields, or an absolute-form target whose authority is not Host.
    BadHost,
    /// A path or query the normaliser refuses (bad encoding, control characters,
    /// encoded separators or traversal, double encoding).
    BadPath,
    /// An upstream response with ambiguous framing.
    UpstreamBadFraming,
    /// A site or route access list refused the client.
    AccessDenied,
    /// A rate limit refused the request.
    RateLimited,
    /// A WAF rule blocked the request.
    WafBlocked,
    /// The body is longer than the WAF may inspect, and `body_overflow = "block"`.
    WafBodyLimit,
}

impl Reason {
    /// The JSON body of an answer the edge makes itself, with its newline:
    /// `{"detail":..,"reason":..,"request_id":..,"status":..}` (detail when given).
    pub fn json_body(self, status: u16, request_id: &str, detail: Option<&str>) -> String {
        let mut body = serde_json::json!({
            "status": status,
            "reason": self.as_str(),
            "request_id": request_id,
        });
        if let Some(d) = detail {
            body["detail"] = serde_json::Value::from(d);
        }
        format!("{body}\n")
    }

    pub const ALL: [Reason; 33] = [
        Reason::Proxied,
        Reason::NoMatchingSite,
        Reason::NoMatchingRoute,
        Reason::HttpsRedirect,
        Reason::UriTooLong,
        Reason::HeadersTooLarge,
        Reason::RequestBodyTooLarge,
        Reason::BadRequest,
        Reason::MethodNotAllowed,
        Reason::NoAvailableBackend,
        Reason::UpstreamConnectRefused,
        Reason::UpstreamConnectTimeout,
        Reason::UpstreamConnectError,
        Reason::UpstreamDnsError,
        Reason::UpstreamTlsError,
        Reason::UpstreamReset,
        Reason::UpstreamInvalidResponse,
        Reason::UpstreamHeaderTimeout,
        Reason::UpstreamRequestTimeout,
        Reason::UpstreamBodyIdleTimeout,
        Reason::UpstreamBodyError,
        Reason::ClientBodyError,
        Reason::ClientBodyTimeout,
        Reason::OnlyIfCachedMiss,
        Reason::PurgeNotAllowed,
        Reason::BadFraming,
        Reason::BadHost,
        Reason::BadPath,
        Reason::UpstreamBadFraming,
        Reason::AccessDenied,
        Reason::RateLimited,
        Reason::WafBlocked,
        Reason::WafBodyLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Proxied => "PROXIED",
            Reason::NoMatchingSite => "NO_MATCHING_SITE",
            Reason::NoMatchingRoute => "NO_MATCHING_ROUTE",
            Reason::HttpsRedirect => "HTTPS_REDIRECT",
            Reason::UriTooLong => "URI_TOO_LONG",
            Reason::HeadersTooLarge => "REQUEST_HEADERS_TOO_LARGE",
            Reason::RequestBodyTooLarge => "REQUEST_BODY_TOO_LARGE",
            Reason::BadRequest => "BAD_REQUEST",
            Reason::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Reason::NoAvailableBackend => "NO_AVAILABLE_BACKEND",
            Reason::UpstreamConnectRefused => "UPSTREAM_CONNECT_REFUSED",
            Reason::UpstreamConnectTimeout => "UPSTREAM_CONNECT_TIMEOUT",
            Reason::UpstreamConnectError => "UPSTREAM_CONNECT_ERROR",
            Reason::UpstreamDnsError => "UPSTREAM_DNS_ERROR",
            Reason::UpstreamTlsError => "UPSTREAM_TLS_ERROR",
            Reason::UpstreamReset => "UPSTREAM_RESET",
            Reason::UpstreamInvalidResponse => "UPSTREAM_INVALID_RESPONSE",
            Reason::UpstreamHeaderTimeout => "UPSTREAM_HEADER_TIMEOUT",
            Reason::UpstreamRequestTimeout => "UPSTREAM_REQUEST_TIMEOUT",
            Reason::UpstreamBodyIdleTimeout => "UPSTREAM_BODY_IDLE_TIMEOUT",
            Reason::UpstreamBodyError => "UPSTREAM_BODY_ERROR",
            Reason::ClientBodyError => "CLIENT_BODY_ERROR",
            Reason::ClientBodyTimeout => "CLIENT_BODY_TIMEOUT",
            Reason::OnlyIfCachedMiss => "ONLY_IF_CACHED_MISS",
            Reason::PurgeNotAllowed => "PURGE_NOT_ALLOWED",
            Reason::BadFraming => "BAD_FRAMING",
            Reason::BadHost => "BAD_HOST",
            Reason::BadPath => "BAD_PATH",
            Reason::UpstreamBadFraming => "UPSTREAM_BAD_FRAMING",
            Reason::AccessDenied => "ACCESS_DENIED",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::WafBlocked => "WAF_BLOCKED",
            Reason::WafBodyLimit => "WAF_BODY_LIMIT",
        }
    }

    /// The status the edge answers with when it generates the response itself.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::Proxied => StatusCode::OK,
            Reason::NoMatchingSite | Reason::NoMatchingRoute => StatusCode::NOT_FOUND,
            Reason::HttpsRedirect => StatusCode::PERMANENT_REDIRECT,
            Reason::UriTooLong => StatusCode::URI_TOO_LONG,
            Reason::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::RequestBodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BadRequest | Reason::ClientBodyError | Reason::BadFraming | Reason::BadHost | Reason::BadPath => {
                StatusCode::BAD_REQUEST
            }
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::NoAvailableBackend => StatusCode::SERVICE_UNAVAILABLE,
            Reason::UpstreamConnectTimeout
            | Reason::UpstreamHeaderTimeout
            | Reason::UpstreamRequestTimeout
            | Reason::UpstreamBodyIdleTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Reason::OnlyIfCachedMiss => StatusCode::GATEWAY_TIMEOUT,
            Reason::PurgeNotAllowed | Reason::AccessDenied => StatusCode::FORBIDDEN,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::WafBlocked => StatusCode::FORBIDDEN,
            Reason::WafBodyLimit => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::UpstreamConnectRefused
            | Reason::UpstreamConnectError
            | Reason::UpstreamDnsError
            | Reason::UpstreamTlsError
            | Reason::UpstreamReset
            | Reason::UpstreamInvalidResponse
            | Reason::UpstreamBadFraming
            | Reason::UpstreamBodyError => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether this reason is an upstream failure (counted in `rampart_upstream_errors_total`).
    pub fn is_upstream_error(self) -> bool {
        self.as_str().starts_with("UPSTREAM_")
    }
}
