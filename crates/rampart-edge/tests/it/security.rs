//! The security pipeline over raw sockets: request framing, normalisation.

use crate::common::*;
use rampart_testkit::Origin;
use std::time::Duration;

/// Send raw bytes; the reply's status, whether the edge closed the connection
/// (rather than leaving it open for the next request), and the reply text.
async fn exchange(e: &TestEdge, bytes: &[u8]) -> (u16, bool, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(e.http).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out))
        .await
        .is_ok();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, closed, text)
}

/// Each case is answered 400 and the connection closed, before any upstream sees it
/// (`reason` when the edge itself explains the refusal with a detail; the heads hyper
/// refuses get `BAD_REQUEST` and a request id too).
#[tokio::test]
async fn ambiguous_framing_is_refused_and_the_connection_closed() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&o.url(), "")).await;
    let cases: &[(&str, &[u8], Option<&str>)] = &[
        (
            "content-length with transfer-encoding",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Some("BAD_FRAMING"),
        ),
        (
            "a coding before chunked",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            Some("BAD_FRAMING"),
        ),
        (
            "chunked twice",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Some("BAD_FRAMING"),
        ),
        (
            "chunked not last",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            None,
        ),
        (
            "unknown coding",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            None,
        ),
        (
            "transfer-encoding in HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            None,
        ),
        (
            "differing content-lengths",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            None,
        ),
        (
            "content-length list",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 5\r\n\r\nabcde",
            None,
        ),
        (
            "signed content-length",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd",
            None,
        ),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n", None),
        ("bare CR", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n", None),
        (
            "whitespace before the colon",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\nabc",
            None,
        ),
        (
            "NUL in a field",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
            None,
        ),
        (
            "control character in the target",
            b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n",
            None,
        ),
        (
            "absolute-form authority differs from Host",
            b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            Some("BAD_HOST"),
        ),
        (
            "two Host fields",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            Some("BAD_HOST"),
        ),
        ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", Some("BAD_HOST")),
    ];
    for (name, bytes, reason) in cases {
        let (status, closed, text) = exchange(&e, bytes).await;
        assert_eq!(status, 400, "{name}: {text}");
        assert!(closed, "{name}: the connection stays open");
        // Every answer has a request id and a reason, hyper's own 400s included.
        assert!(text.contains("x-request-id: "), "{name}: {text}");
        assert!(text.contains("x-rampart-reason: "), "{name}: {text}");
        if let Some(r) = reason {
            assert!(text.contains(&format!("x-rampart-reason: {r}")), "{name}: {text}");
            assert!(text.contains("\"detail\":"), "{name}: {text}");
        }
    }
    assert_eq!(o.requests(), 0, "nothing reached the origin");
}

/// The answers hyper makes by itself (heads it cannot parse, heads over the size
/// limit) carry a request id, a reason code and the JSON body like every other.
#[tokio::test]
async fn heads_hyper_refuses_are_answered_with_a_request_id() {
    let o = Origin::start("o").await.unwrap();
    let cfg = simple(&o.url(), "").replace("access = \"off\"", "access = \"access.log\"");
    let e = TestEdge::start(&cfg).await;
    let mut ids = Vec::new();
    // Too many fields (hyper's 431) in a small head: all of it is read before the
    // answer, so closing does not reset the connection under the reply.
    let mut huge = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..500 {
        huge.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    let cases: [(&str, Vec<u8>, u16, &str); 3] = [
        (
            "bad header name",
            b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n".to_vec(),
            400,
            "BAD_REQUEST",
        ),
        (
            "unknown version",
            b"GET / HTTP/3.7\r\nHost: a\r\n\r\n".to_vec(),
            400,
            "BAD_REQUEST",
        ),
        ("too many fields", huge, 431, "REQUEST_HEADERS_TOO_LARGE"),
    ];
    for (name, bytes, code, reason) in cases {
        let (status, closed, text) = exchange(&e, &bytes).await;
        assert_eq!(status, code, "{name}: {text}");
        assert!(closed, "{name}: the connection stays open");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let id = head
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("{name}: no request id: {head}"));
        assert_eq!(id.len(), 32, "{name}: {head}");
        assert!(head.contains(&format!("x-rampart-reason: {reason}")), "{name}: {head}");
        assert!(head.contains("\r\ndate: "), "{name}: {head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["status"], code);
        assert_eq!(json["reason"], reason);
        assert_eq!(json["request_id"], id);
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len(), "{name}");
        ids.push((id.to_string(), code, reason, len));
    }
    assert_eq!(o.requests(), 0);
    // Each is in the access log, under its request id, like every other answer.
    let path = e.dir.join("access.log");
    let logged = eventually(
        || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            ids.iter().all(|(id, ..)| text.contains(id.as_str()))
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(logged, "not in the access log");
    let text = std::fs::read_to_string(&path).unwrap();
    for (id, code, reason, len) in &ids {
        let line: serde_json::Value = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| l["request_id"] == id.as_str())
            .unwrap();
        assert_eq!(line["status"], *code);
        assert_eq!(line["reason"], *reason);
        assert_eq!(line["client_ip"], "127.0.0.1");
        assert_eq!(line["method"], "-");
        assert!(line["bytes_out"].as_u64().unwrap() > *len as u64);
    }
}

/// Chunked bodies the parser cannot frame: 400, connection closed.
#[tokio::test]
async fn bad_chunks_are_refused() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&o.url(), "")).await;
    for (name, bytes) in [
        (
            "chunk size not hex",
            &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"[..],
        ),
        (
            "chunk size overflow",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "bare LF after the size",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        ),
        (
            "bare LF in an extension",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;a\nb\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "NUL in an extension",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;foo\x00\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "extension without a name",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;=1\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "unterminated quoted extension",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;a=\"x\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "data longer than its size",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
        ),
    ] {
        let (status, closed, text) = exchange(&e, bytes).await;
        assert_eq!(status, 400, "{name}: {text}");
        assert!(closed, "{name}");
    }
    // Valid extensions pass, and the body arrives re-framed without them.
    let ok = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3 ; a = b ;c=\"q x\"\r\nabc\r\n0\r\n\r\n";
    let (status, _, text) = exchange(&e, ok).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn paths_are_normalised_once_for_routing_and_forwarding() {
    let o = Origin::start("o").await.unwrap();
    let cfg = simple(&o.url(), "").replace("[log]", "[admin]\nlisten = \"127.0.0.1:0\"\n[log]");
    let e = TestEdge::start(&cfg).await;
    let refused = [
        ("/a%00b", "control-character"),
        ("/a%zzb", "invalid-percent-encoding"),
        ("/static/..%2F..%2Fetc/passwd", "encoded-traversal"),
        ("/a/%252e%252e/b", "double-encoding"),
        ("/a/%5c..%5cwin.ini", "encoded-traversal"),
        ("/q?x=%00", "control-character"),
    ];
    for (p, detail) in refused {
        let req = format!("GET {p} HTTP/1.1\r\nHost: a\r\n\r\n");
        let (status, closed, text) = exchange(&e, req.as_bytes()).await;
        assert_eq!(status, 400, "{p}: {text}");
        assert!(closed, "{p}");
        assert!(text.contains("x-rampart-reason: BAD_PATH"), "{p}: {text}");
        assert!(text.contains(&format!("\"detail\":\"{detail}\"")), "{p}: {text}");
    }
    assert_eq!(o.requests(), 0);
    // Encoded dot segments and unreserved characters: forwarded normalised.
    for (sent, forwarded) in [
        ("/a/%2e%2e/b/%7Euser", "/b/~user"),
        ("/x/./y/../%41", "/x/A"),
        ("/keep%2fslash", "/keep%2Fslash"),
    ] {
        let r = client().get(e.url(sent)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{sent}");
        assert_eq!(o.paths().last().map(String::as_str), Some(forwarded), "{sent}");
    }
    let metrics = e.metrics().await;
    assert!(
        metrics.contains(r#"rampart_security_decisions_total{stage="normalize",reason="BAD_PATH",action="block"} 6"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn normalisation_settings() {
    let o = Origin::start("o").await.unwrap();
    let cfg = simple(&o.url(), "").replace(
        "[log]",
        "[server.normalize]\nmerge_slashes = true\nencoded_slash = \"decode\"\ndouble_encoding = \"decode\"\n[log]",
    );
    let e = TestEdge::start(&cfg).await;
    for (sent, forwarded) in [("//a///b", "/a/b"), ("/a%2Fb", "/a/b"), ("/x/%252e%252e/y", "/y")] {
        let r = client().get(e.url(sent)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{sent}");
        assert_eq!(o.paths().last().map(String::as_str), Some(forwarded), "{sent}");
    }
    let cfg = simple(&o.url(), "").replace("[log]", "[server.normalize]\nencoded_slash = \"reject\"\n[log]");
    let e = TestEdge::start(&cfg).await;
    let r = client().get(e.url("/a%2Fb")).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn an_upstream_response_with_ambiguous_framing_is_not_passed_on() {
    let o = Origin::raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let e = TestEdge::start(&simple(&o.url(), "")).await;
    let r = client().get(e.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-rampart-reason"], "UPSTREAM_BAD_FRAMING");
}

/// A config with an admin listener, one pool and a default site whose `/` route
/// goes to it, with room for extras: `[server]` fields, top-level sections, site
/// fields, the `/` route's fields and more routes.
fn edge_config(o: &Origin, server: &str, top: &str, site: &str, route: &str, routes: &str) -> String {
    one_pool(
        &[&o.url()],
        Parts {
            server,
            admin: Some(""),
            top,
            site,
            route,
            routes,
            ..Parts::default()
        },
    )
}

fn acl_config(o: &Origin, server_extra: &str, site_access: &str, route_access: &str) -> String {
    let private =
        format!("  [[site.route]]\n  path = \"/private/\"\n  pool = \"app\"\n  access = {{ {route_access} }}");
    edge_config(
        o,
        server_extra,
        "",
        &format!("access = {{ {site_access} }}"),
        "",
        &private,
    )
}

fn limited_config(o: &Origin, rule: &str) -> String {
    let free = "  [[site.route]]\n  path = \"/free/\"\n  pool = \"app\"";
    edge_config(
        o,
        "",
        &format!("[[rate_limit]]\n{rule}"),
        "",
        "rate_limits = [\"api\"]",
        free,
    )
}

fn waf_config(o: &Origin, waf: &str) -> String {
    let top = format!("{waf}\n[[rate_limit]]\nname = \"tight\"\nrate = \"1/m\"\nburst = 1");
    edge_config(o, "", &top, "explain = true\nrate_limits = [\"tight\"]", "", "")
}

async fn status_reason(e: &TestEdge, path: &str, headers: &[(&str, &str)]) -> (u16, String, serde_json::Value) {
    let mut r = client().get(e.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let reason = r
        .headers()
        .get("x-rampart-reason")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, reason, body)
}

#[tokio::test]
async fn access_lists_by_ip_and_header() {
    let o = Origin::start("o").await.unwrap();
    let site = r#"deny_headers = [{ name = "user-agent", matches = "(?i)sqlmap|nikto" }], strip_headers = ["x-internal-token"]"#;
    let route = r#"deny_ips = ["127.0.0.1"], require_headers = [{ name = "x-api-key", matches = "^k-" }]"#;
    let e = TestEdge::start(&acl_config(&o, "", site, route)).await;
    let (s, _, body) = status_reason(&e, "/echo", &[("x-internal-token", "secret")]).await;
    assert_eq!(s, 200);
    assert!(body["headers"].get("x-internal-token").is_none(), "stripped: {body}");
    let (s, r, body) = status_reason(&e, "/", &[("user-agent", "sqlmap/1.7")]).await;
    assert_eq!((s, r.as_str()), (403, "ACCESS_DENIED"));
    assert_eq!(body["detail"], "header-denied:user-agent");
    let (s, _, body) = status_reason(&e, "/private/x", &[("x-api-key", "k-1")]).await;
    assert_eq!(
        (s, body["detail"].as_str()),
        (403, Some("ip-denied")),
        "route list after the site's"
    );
    assert_eq!(o.requests(), 1);

    let route = r#"allow_ips = ["127.0.0.0/8", "::1"], require_headers = [{ name = "x-api-key", matches = "^k-" }]"#;
    let e = TestEdge::start(&acl_config(&o, "", "", route)).await;
    assert_eq!(status_reason(&e, "/private/x", &[("x-api-key", "k-1")]).await.0, 200);
    let (s, _, body) = status_reason(&e, "/private/x", &[("x-api-key", "nope")]).await;
    assert_eq!((s, body["detail"].as_str()), (403, Some("header-required:x-api-key")));
}

#[tokio::test]
async fn the_client_ip_comes_from_trusted_proxies_only() {
    let o = Origin::start("o").await.unwrap();
    let site = r#"allow_ips = ["203.0.113.0/24"]"#;
    let trusted = "trusted_proxies = [\"127.0.0.1\"]";
    let e = TestEdge::start(&acl_config(&o, trusted, site, "")).await;
    assert_eq!(
        status_reason(&e, "/", &[]).await.0,
        403,
        "the proxy itself is not allowed"
    );
    assert_eq!(
        status_reason(&e, "/", &[("x-forwarded-for", "203.0.113.9")]).await.0,
        200
    );
    // The right-most untrusted hop counts: a spoofed left-most entry does not help.
    let (s, _, body) = status_reason(&e, "/", &[("x-forwarded-for", "203.0.113.9, 198.51.100.1")]).await;
    assert_eq!((s, body["detail"].as_str()), (403, Some("ip-not-allowed")));
    // Without trust in the peer, X-Forwarded-For is ignored.
    let e = TestEdge::start(&acl_config(&o, "", site, "")).await;
    assert_eq!(
        status_reason(&e, "/", &[("x-forwarded-for", "203.0.113.9")]).await.0,
        403
    );
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_carry_the_client_address() {
    let o = Origin::start("o").await.unwrap();
    let site = r#"allow_ips = ["203.0.113.0/24", "2001:db8::/32"]"#;
    let server = "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = [\"127.0.0.1:0\"]";
    let e = TestEdge::start(&acl_config(&o, server, site, "")).await;
    let get = b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

    let mut v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\n".to_vec();
    v1.extend_from_slice(get);
    let (status, _, text) = exchange(&e, &v1).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("203.0.113.9"),
        "X-Forwarded-For carries the client: {text}"
    );

    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x21, 0, 36]);
    v2.extend_from_slice(&"2001:db8::5".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v2.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    v2.extend_from_slice(&[0x9c, 0x40, 0, 80]);
    v2.extend_from_slice(get);
    let (status, _, text) = exchange(&e, &v2).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("2001:db8::5"), "{text}");

    // An address the access list refuses, and a connection without a header.
    let mut other = b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 80\r\n".to_vec();
    other.extend_from_slice(get);
    assert_eq!(exchange(&e, &other).await.0, 403);
    let (status, closed, text) = exchange(&e, get).await;
    assert_eq!((status, closed), (0, true), "closed without an answer: {text}");
}

#[tokio::test]
async fn access_list_config_errors_name_the_field() {
    let o = Origin::start("o").await.unwrap();
    let cfg = acl_config(
        &o,
        "",
        r#"allow_ips = ["10.0.0.0/99"]"#,
        r#"deny_headers = [{ name = "x", matches = "(" }]"#,
    );
    let v = rampart_config::load_str(&cfg, &temp_dir()).unwrap();
    let err = rampart_edge::check(v).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("site[0].access.allow_ips[0]"), "{err}");
    assert!(err.contains("site[0].route[1].access.deny_headers[0].matches"), "{err}");
}

#[tokio::test]
async fn proxy_protocol_config_errors() {
    let o = Origin::start("o").await.unwrap();
    let cfg = acl_config(&o, "proxy_protocol = [\"127.0.0.1:1\"]", "", "");
    let err = rampart_config::load_str(&cfg, &temp_dir()).err().unwrap().to_string();
    assert!(
        err.contains("server.proxy_protocol[0]: \"127.0.0.1:1\" is not one of server.listen"),
        "{err}"
    );
    assert!(err.contains("server.proxy_protocol: only trusted proxies"), "{err}");
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_ratelimit_headers() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&limited_config(&o, "name = \"api\"\nrate = \"2/m\"\nburst = 2")).await;
    let r = client().get(e.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header_str(&r, "ratelimit-policy"), "\"api\";q=2;w=60");
    assert_eq!(header_str(&r, "ratelimit"), "\"api\";r=1;t=30", "full again in 30 s");
    let r = client().get(e.url("/b")).send().await.unwrap();
    assert_eq!(header_str(&r, "ratelimit"), "\"api\";r=0;t=60");
    let r = client().get(e.url("/c")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header_str(&r, "x-rampart-reason"), "RATE_LIMITED");
    assert_eq!(header_str(&r, "retry-after"), "30", "one request per 30 s");
    assert_eq!(header_str(&r, "ratelimit"), "\"api\";r=0;t=60");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["detail"], "api");
    // Another route without the rule is not limited.
    assert_eq!(client().get(e.url("/free/x")).send().await.unwrap().status(), 200);
    assert_eq!(o.requests(), 3);
    let metrics = e.metrics().await;
    assert!(
        metrics
            .contains(r#"rampart_security_decisions_total{stage="rate_limit",reason="RATE_LIMITED",action="block"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn shadow_rate_limits_count_without_refusing() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&limited_config(
        &o,
        "name = \"api\"\nrate = \"1/m\"\nburst = 1\nshadow = true",
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(client().get(e.url("/a")).send().await.unwrap().status(), 200);
    }
    let metrics = e.metrics().await;
    assert!(
        metrics
            .contains(r#"rampart_security_decisions_total{stage="rate_limit",reason="RATE_LIMITED",action="log"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn rate_limit_config_errors_name_the_field() {
    let o = Origin::start("o").await.unwrap();
    let cfg = limited_config(&o, "name = \"other\"\nrate = \"2/d\"\nkey = \"body\"");
    let v = rampart_config::load_str(&cfg, &temp_dir()).unwrap();
    let err = rampart_edge::check(v).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("rate_limit[0].key"), "{err}");
    assert!(err.contains("rate_limit[0].rate"), "{err}");
    assert!(
        err.contains("site[0].route[0].rate_limits[0]: no rate_limit named \"api\""),
        "{err}"
    );
}

const RULES: &str = r#"
[waf]
body_limit = "1KiB"
[[waf.rule]]
id = "office"
expression = 'http.request.headers["x-office"] eq "1"'
action = "allow"
[[waf.rule]]
id = "scanner"
expression = 'lower(http.user_agent) contains "sqlmap"'
action = "block"
[[waf.rule]]
id = "teapot"
expression = 'http.request.uri.path eq "/brew" and http.request.method eq "POST"'
action = "block"
status = 418
body = "no coffee here"
[[waf.rule]]
id = "watch-admin"
expression = 'starts_with(http.request.uri.path, "/admin")'
action = "log"
[[waf.rule]]
id = "sqli-body"
expression = 'lower(url_decode(http.request.body.raw)) contains "union select"'
action = "block"
[[waf.rule]]
id = "trial"
expression = 'http.request.uri.query contains "trial"'
action = "block"
shadow = true
"#;

#[tokio::test]
async fn waf_rules_block_log_allow_and_inspect_bodies() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&waf_config(&o, RULES)).await;
    // Blocked: the default answer names the rule and the request id.
    let r = client()
        .get(e.url("/"))
        .header("user-agent", "SQLMap/1.7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(header_str(&r, "x-rampart-reason"), "WAF_BLOCKED");
    let id = header_str(&r, "x-request-id");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (body["rule"].as_str(), body["request_id"].as_str()),
        (Some("scanner"), Some(id.as_str()))
    );
    // A configured status and body.
    let r = client().post(e.url("/brew")).send().await.unwrap();
    assert_eq!(r.status(), 418);
    assert_eq!(r.text().await.unwrap(), "no coffee here");
    // The body is inspected (decoded) up to the bound, then still forwarded whole.
    let r = client()
        .post(e.url("/echo"))
        .header("x-office", "1")
        .body("q=1%20UNION%20SELECT%20password")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "allow stops the rules before sqli-body");
    let r = client()
        .post(e.url("/echo"))
        .body("q=1%20UNION%20SELECT%20password")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["rule"], "sqli-body");
    assert_eq!(o.requests(), 1);
    // Logged and shadowed rules let the request through (then the rate limit applies).
    let r = client().get(e.url("/admin/x?trial=1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header_str(&r, "x-rampart-security"),
        "waf:watch-admin=log,waf:trial=log",
        "explained when the site explains"
    );
    let metrics = e.metrics().await;
    for line in [
        r#"rampart_waf_rule_matches_total{rule="scanner",action="block"} 1"#,
        r#"rampart_waf_rule_matches_total{rule="watch-admin",action="log"} 1"#,
        r#"rampart_waf_rule_matches_total{rule="trial",action="log"} 1"#,
        r#"rampart_waf_rule_matches_total{rule="office",action="allow"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    // `allow` skips the rate limit: the office is never limited.
    for _ in 0..3 {
        let r = client().get(e.url("/")).header("x-office", "1").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(client().get(e.url("/")).send().await.unwrap().status(), 429);
}

#[tokio::test]
async fn a_body_past_the_inspection_bound_passes_or_blocks_as_configured() {
    let o = Origin::start("o").await.unwrap();
    let big = format!("{}union select", "a".repeat(2000));
    let e = TestEdge::start(&waf_config(&o, RULES)).await;
    let r = client().post(e.url("/echo")).body(big.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200, "only the first KiB is inspected");
    let echoed: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echoed["body_length"], big.len(), "the whole body is forwarded");
    let strict = RULES.replace(
        "body_limit = \"1KiB\"",
        "body_limit = \"1KiB\"\nbody_overflow = \"block\"",
    );
    let e = TestEdge::start(&waf_config(&o, &strict)).await;
    let r = client().post(e.url("/echo")).body(big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(header_str(&r, "x-rampart-reason"), "WAF_BODY_LIMIT");
}

#[tokio::test]
async fn global_shadow_mode_logs_every_block() {
    let o = Origin::start("o").await.unwrap();
    let shadow = RULES.replace("[waf]\n", "[waf]\nshadow = true\n");
    let e = TestEdge::start(&waf_config(&o, &shadow)).await;
    let r = client()
        .get(e.url("/"))
        .header("user-agent", "sqlmap")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let metrics = e.metrics().await;
    assert!(
        metrics.contains(r#"rampart_waf_rule_matches_total{rule="scanner",action="log"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_rule_error_is_a_config_error_with_the_rule_and_position() {
    let o = Origin::start("o").await.unwrap();
    let bad = "[waf]\n[[waf.rule]]\nid = \"x\"\nexpression = 'http.request.method = \"GET\"'\naction = \"block\"\n";
    let v = rampart_config::load_str(&waf_config(&o, bad), &temp_dir()).unwrap();
    let err = rampart_edge::check(v).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("waf.rule[0].expression: rule \"x\": at column 21: expected an operator"),
        "{err}"
    );
}
