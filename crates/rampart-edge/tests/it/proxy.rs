//! The proxy core over real sockets: forwarding, routing, headers, limits,
//! and every upstream failure mapped to 502/504 with a reason code.

use crate::common::*;
use rampart_testkit::{Origin, closed_port};
use std::time::{Duration, Instant};

#[tokio::test]
async fn forwards_a_request_and_streams_the_response() {
    let origin = Origin::start("o1").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "")).await;
    let r = client().get(e.url("/hello")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-origin-name"], "o1");
    assert_eq!(r.headers()["via"], "1.1 rampart");
    assert_eq!(r.headers()["x-request-id"].len(), 32);
    assert_eq!(r.headers()["x-rampart-upstream"], origin.url().as_str());
    assert_eq!(r.text().await.unwrap(), "hello from o1\n");

    let r = client().get(e.url("/large?size=3000000")).send().await.unwrap();
    assert_eq!(r.headers()["content-length"], "3000000");
    assert_eq!(r.bytes().await.unwrap().len(), 3_000_000);
}

#[tokio::test]
async fn request_bodies_stream_upstream() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "")).await;
    let body = vec![b'z'; 2 * 1024 * 1024];
    let r = client().post(e.url("/echo")).body(body).send().await.unwrap();
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["body_length"], 2 * 1024 * 1024);
    assert_eq!(j["method"], "POST");
}

#[tokio::test]
async fn routes_by_host_and_path() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let c = Origin::start("c").await.unwrap();
    let cfg = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
[log]
access = "off"
[[pool]]
name = "a"
backends = ["{a}"]
[[pool]]
name = "b"
backends = ["{b}"]
[[pool]]
name = "c"
backends = ["{c}"]
[[site]]
hosts = ["example.test", "*.example.test"]
  [[site.route]]
  path = "/"
  pool = "a"
  [[site.route]]
  path = "/api/"
  pool = "b"
  strip_prefix = true
  [[site.route]]
  exact = "/exact"
  pool = "c"
  [[site.route]]
  glob = "/img/*.png"
  pool = "c"
  [[site.route]]
  path = "/v1/"
  pool = "b"
  rewrite_prefix = "/v2/"
  host_header = "backend"
[[site]]
hosts = ["other.test"]
  [[site.route]]
  path = "/"
  pool = "c"
"#,
        a = a.url(),
        b = b.url(),
        c = c.url()
    );
    let e = TestEdge::start(&cfg).await;
    let get = |host: &'static str, path: &'static str| {
        let url = e.url(path);
        async move { client().get(url).header("host", host).send().await.unwrap() }
    };
    assert_eq!(get("example.test", "/x").await.headers()["x-origin-name"], "a");
    assert_eq!(get("WWW.Example.Test:80", "/x").await.headers()["x-origin-name"], "a");
    assert_eq!(get("other.test", "/x").await.headers()["x-origin-name"], "c");
    assert_eq!(get("example.test", "/exact").await.headers()["x-origin-name"], "c");
    assert_eq!(get("example.test", "/img/a.png").await.headers()["x-origin-name"], "c");
    assert_eq!(
        get("example.test", "/img/a/b.png").await.headers()["x-origin-name"],
        "a"
    );

    let j: serde_json::Value = get("example.test", "/api/echo?q=1").await.json().await.unwrap();
    assert_eq!(j["origin"], "b");
    assert_eq!(j["path"], "/echo", "prefix stripped");
    assert_eq!(j["query"], "q=1");
    assert_eq!(j["headers"]["host"][0], "example.test", "host preserved by default");

    let r = get("example.test", "/v1/echo").await;
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["path"], "/v2/echo", "prefix rewritten");
    assert_eq!(
        j["headers"]["host"][0],
        b.addr().to_string(),
        "host rewritten to the backend's"
    );

    let r = get("nowhere.test", "/").await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-rampart-reason"], "NO_MATCHING_SITE");
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_and_forwarding_headers_set() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "")).await;
    let r = client()
        .get(e.url("/echo"))
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "gzip")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-request-id", "spoofed-id")
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    let j: serde_json::Value = r.json().await.unwrap();
    let h = &j["headers"];
    for gone in ["x-private", "keep-alive", "proxy-connection", "te"] {
        assert!(h.get(gone).is_none(), "{gone} should be stripped: {h}");
    }
    assert_eq!(h["x-custom"][0], "kept");
    assert_eq!(h["x-forwarded-for"][0], "127.0.0.1", "untrusted XFF replaced");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["via"][0], "1.1 rampart");
    assert_ne!(h["x-request-id"][0], "spoofed-id", "untrusted request id replaced");
}

#[tokio::test]
async fn forwarding_fields_are_set_once_whichever_way_the_request_goes() {
    // The fields the proxy sets are added when the request is written (lean path),
    // put in the header map early (a balancer hashing on a header may read them), or
    // given to hyper's client (a request with a body): the upstream sees the same.
    let origin = Origin::start("o").await.unwrap();
    let hashed = "balance = \"consistent_hash\"\nhash_key = \"header:x-forwarded-for\"";
    for pool in ["", hashed] {
        let cfg = one_pool(
            &[&origin.url()],
            Parts {
                pool,
                ..Parts::default()
            },
        );
        let e = TestEdge::start(&cfg).await;
        for with_body in [false, true] {
            let mut req = if with_body {
                client().post(e.url("/echo")).body("x")
            } else {
                client().get(e.url("/echo"))
            };
            for (k, v) in [
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-proto", "gopher"),
                ("x-forwarded-host", "spoofed.test"),
                ("x-request-id", "spoofed-id"),
                ("via", "1.0 a"),
                ("via", "1.1 b"),
            ] {
                req = req.header(k, v);
            }
            let r = req.header("host", "site.test").send().await.unwrap();
            let id = header_str(&r, "x-request-id");
            let j: serde_json::Value = r.json().await.unwrap();
            let h = &j["headers"];
            let one = |name: &str| {
                let v = h[name].as_array().unwrap_or_else(|| panic!("{name} missing: {h}"));
                assert_eq!(v.len(), 1, "one {name} ({pool:?}, body {with_body}): {h}");
                v[0].as_str().unwrap().to_string()
            };
            assert_eq!(one("x-forwarded-for"), "127.0.0.1");
            assert_eq!(one("x-forwarded-proto"), "http");
            assert_eq!(one("x-forwarded-host"), "site.test");
            assert_eq!(one("via"), "1.0 a, 1.1 b, 1.1 rampart");
            assert_eq!(one("x-request-id"), id, "ours, as the client was told");
            assert_ne!(id, "spoofed-id");
        }
    }
}

#[tokio::test]
async fn trusted_proxies_are_appended_to_and_their_request_id_honoured() {
    let origin = Origin::start("o").await.unwrap();
    let cfg = simple(&origin.url(), "").replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\"]\ntrusted_proxies = [\"127.0.0.0/8\"]",
    );
    let e = TestEdge::start(&cfg).await;
    let r = client()
        .get(e.url("/echo"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["headers"]["x-forwarded-for"][0], "6.6.6.6, 127.0.0.1");
    assert_eq!(j["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(j["headers"]["x-request-id"][0], "abc-123");
}

async fn reason(e: &TestEdge, path: &str) -> (u16, String, Duration) {
    let t = Instant::now();
    let r = client().get(e.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let reason = r
        .headers()
        .get("x-rampart-reason")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = r.text().await.unwrap();
    if status >= 500 {
        assert!(body.contains(&reason), "JSON body names the reason: {body}");
    }
    (status, reason, t.elapsed())
}

#[tokio::test]
async fn refused_connection_is_502() {
    let dead = closed_port().await.unwrap();
    let e = TestEdge::start(&simple(&format!("http://{dead}"), "")).await;
    let (s, r, _) = reason(&e, "/").await;
    assert_eq!((s, r.as_str()), (502, "UPSTREAM_CONNECT_REFUSED"));
}

#[tokio::test]
async fn reset_connection_is_502() {
    let origin = Origin::resetting().await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "")).await;
    let (s, r, _) = reason(&e, "/").await;
    assert_eq!((s, r.as_str()), (502, "UPSTREAM_RESET"));
}

#[tokio::test]
async fn invalid_response_is_502() {
    let origin = Origin::raw(b"HTTP/1.1 abc\r\nbroken\r\n\r\n").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "")).await;
    let (s, r, _) = reason(&e, "/").await;
    assert_eq!((s, r.as_str()), (502, "UPSTREAM_INVALID_RESPONSE"));
}

#[tokio::test]
async fn connect_timeout_is_504() {
    let hole = rampart_testkit::Blackhole::start().await.unwrap();
    let e = TestEdge::start(&simple(&hole.url(), "timeouts = { connect = \"200ms\" }")).await;
    let (s, r, took) = reason(&e, "/").await;
    assert_eq!((s, r.as_str()), (504, "UPSTREAM_CONNECT_TIMEOUT"));
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(5),
        "took {took:?}"
    );
}

#[tokio::test]
async fn hanging_upstream_is_504_after_the_header_timeout() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "timeouts = { response_header = \"300ms\" }")).await;
    let (s, r, took) = reason(&e, "/hang").await;
    assert_eq!((s, r.as_str()), (504, "UPSTREAM_HEADER_TIMEOUT"));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn the_header_timeout_holds_for_every_request_on_a_connection() {
    // The lean server lends one timer per connection to the pipeline: it must fire
    // again after it fired once, and a fast answer in between must not be cut.
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "timeouts = { response_header = \"300ms\" }")).await;
    let mut s = tokio::net::TcpStream::connect(e.edge().http_addrs()[0]).await.unwrap();
    for (path, status) in [("/hang", 504), ("/?delay=100ms", 200), ("/hang", 504), ("/", 200)] {
        let t = Instant::now();
        let req = format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
            .await
            .unwrap();
        let (head, _) = read_response(&mut s).await;
        let took = t.elapsed();
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{path}: {head}");
        if status == 504 {
            assert!(head.contains("UPSTREAM_HEADER_TIMEOUT"), "{head}");
            assert!(
                took >= Duration::from_millis(300) && took < Duration::from_secs(5),
                "{path}: {took:?}"
            );
        }
    }
}

#[tokio::test]
async fn whole_request_timeout_is_504() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "timeouts = { request = \"300ms\" }")).await;
    let (s, r, _) = reason(&e, "/hang").await;
    assert_eq!((s, r.as_str()), (504, "UPSTREAM_REQUEST_TIMEOUT"));
}

#[tokio::test]
async fn stalled_body_is_cut_after_the_idle_timeout() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "timeouts = { body_idle = \"300ms\" }")).await;
    let t = Instant::now();
    let r = client().get(e.url("/stall?after=10")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the body must end in an error, not hang");
    assert!(t.elapsed() < Duration::from_secs(5));

    // A slow body whose chunks arrive within the idle timeout is fine.
    let r = client()
        .get(e.url("/slow?chunks=4&interval=100ms"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "chunk 0\nchunk 1\nchunk 2\nchunk 3\n");
}

#[tokio::test]
async fn limits_give_414_431_413() {
    let origin = Origin::start("o").await.unwrap();
    let cfg = simple(&origin.url(), "").replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\"]\nlimits = { max_uri_length = \"1KiB\", max_header_size = \"4KiB\", max_request_body = \"64KiB\" }",
    );
    let e = TestEdge::start(&cfg).await;
    let long = format!("/{}", "a".repeat(2000));
    let r = client().get(e.url(&long)).send().await.unwrap();
    assert_eq!(r.status(), 414);
    assert_eq!(r.headers()["x-rampart-reason"], "URI_TOO_LONG");

    let r = client()
        .get(e.url("/"))
        .header("x-big", "b".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);

    // Far past the buffer: hyper itself refuses with 431 before the request is parsed.
    let r = client()
        .get(e.url("/"))
        .header("x-big", "b".repeat(60_000))
        .send()
        .await;
    assert!(r.map(|r| r.status() == 431).unwrap_or(true));

    let r = client()
        .post(e.url("/echo"))
        .body(vec![0u8; 65 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["x-rampart-reason"], "REQUEST_BODY_TOO_LARGE");
    assert_eq!(origin.requests(), 0, "nothing over a limit reaches the origin");

    // Chunked (no Content-Length) over the limit: cut off while streaming.
    let chunks = futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![1u8; 8192])));
    let r = client()
        .post(e.url("/echo"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let ok = client()
        .post(e.url("/echo"))
        .body(vec![0u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn weighted_round_robin_spreads_requests() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let cfg = simple(&a.url(), "").replace(
        &format!("backends = [\"{}\"]", a.url()),
        &format!("backends = [\"{}\", {{ url = \"{}\", weight = 3 }}]", a.url(), b.url()),
    );
    let e = TestEdge::start(&cfg).await;
    let c = client();
    for _ in 0..40 {
        assert_eq!(c.get(e.url("/")).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        (a.requests(), b.requests()),
        (10, 30),
        "smooth weighted round-robin is exact"
    );
}

#[tokio::test]
async fn http2_upstream() {
    let origin = Origin::start_h2("h2o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "protocol = \"http2\"")).await;
    let r = client().get(e.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["version"], "HTTP/2.0");
}

/// Trailers on an HTTP/2 request body reach an HTTP/2 upstream: on a body small
/// enough to be read whole (it is sent on as a stream then) and on a streamed one.
#[tokio::test]
async fn request_trailers_reach_an_http2_upstream() {
    use http_body_util::BodyExt;
    let origin = Origin::start_h2("h2o").await.unwrap();
    let cfg = simple(&origin.url(), "protocol = \"http2\"").replace("[server]\n", "[server]\nh2c = true\n");
    let e = TestEdge::start(&cfg).await;
    let tcp = tokio::net::TcpStream::connect(e.http).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for size in [5, 20_000] {
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("x-checksum", hyper::header::HeaderValue::from_static("5d41402a"));
        let frames = [
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(vec![b'h'; size]))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let req = hyper::Request::post(e.url("/echo"))
            .header("content-length", size.to_string())
            .body(http_body_util::StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap();
        let r = send.send_request(req).await.unwrap();
        assert_eq!(r.status(), 200);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["body_length"], size, "{size}");
        assert_eq!(j["trailers"]["x-checksum"], "5d41402a", "{size}: {}", j["trailers"]);
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_when_enabled() {
    let origin = Origin::start("o").await.unwrap();
    let cfg = simple(&origin.url(), "").replace("listen = [\"127.0.0.1:0\"]", "listen = [\"127.0.0.1:0\"]\nh2c = true");
    let e = TestEdge::start(&cfg).await;
    let c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = c.get(e.url("/")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await.unwrap(), "hello from o\n");

    // A small HTTP/2 body of known length is read whole and sent behind its head
    // on the same pooled upstream connection; a large one streams (a new one).
    let r = c.post(e.url("/echo")).body("x".repeat(1000)).send().await.unwrap();
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["body_length"], 1000, "{j}");
    assert_eq!(j["headers"]["content-length"][0], "1000", "{j}");
    assert_eq!(origin.connections(), 1);
    let big = "y".repeat(40 * 1024);
    let r = c.post(e.url("/echo")).body(big.clone()).send().await.unwrap();
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["body"], big.as_str());
    assert_eq!(origin.connections(), 2);
}

#[tokio::test]
async fn max_connections_holds_new_clients_in_the_backlog() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("o").await.unwrap();
    let cfg = simple(&origin.url(), "").replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\"]\nmax_connections = 1",
    );
    let e = TestEdge::start(&cfg).await;
    // The first connection is served and kept open.
    let mut first = tokio::net::TcpStream::connect(e.http).await.unwrap();
    first.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The second connects (kernel backlog) but is not served while the first is open.
    let second = tokio::spawn({
        let addr = e.http;
        async move {
            raw(
                addr,
                b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                Duration::from_secs(10),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "second connection served past the limit");
    assert_eq!(origin.requests(), 1);
    drop(first);
    let reply = second.await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn backend_names_are_resolved() {
    let origin = Origin::start("named").await.unwrap();
    let e = TestEdge::start(&simple(&format!("http://localhost:{}", origin.addr().port()), "")).await;
    let r = client().get(e.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-origin-name"], "named");
}

#[tokio::test]
async fn unresolvable_backend_is_502_dns_error() {
    let e = TestEdge::start(&simple("http://no-such-host.invalid:80", "")).await;
    let (s, r, took) = reason(&e, "/").await;
    assert_eq!((s, r.as_str()), (502, "UPSTREAM_DNS_ERROR"));
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn dot_segments_cannot_reach_another_route() {
    let public = Origin::start("public").await.unwrap();
    let admin = Origin::start("admin").await.unwrap();
    let cfg = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
[log]
access = "off"
[[pool]]
name = "public"
backends = ["{}"]
[[pool]]
name = "admin"
backends = ["{}"]
[[site]]
default = true
  [[site.route]]
  path = "/api/"
  pool = "public"
  [[site.route]]
  path = "/"
  pool = "admin"
"#,
        public.url(),
        admin.url()
    );
    let e = TestEdge::start(&cfg).await;
    // Raw bytes: HTTP client libraries would normalise the path before sending it.
    let reply = raw(
        e.http,
        b"GET /api/../echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        reply.contains("\"origin\":\"admin\""),
        "routed by the normalised path: {reply}"
    );
    assert!(
        reply.contains("\"path\":\"/echo\""),
        "the normalised path is forwarded: {reply}"
    );
    assert_eq!(public.requests(), 0);
}

#[tokio::test]
async fn stalled_client_body_is_408() {
    let origin = Origin::start("o").await.unwrap();
    let cfg = simple(&origin.url(), "").replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\"]\nclient_body_timeout = \"300ms\"",
    );
    let e = TestEdge::start(&cfg).await;
    let t = Instant::now();
    // Promise 100 bytes, send 10, then go quiet (the socket stays open).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(e.http).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("CLIENT_BODY_TIMEOUT"), "{reply}");
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn upstream_that_stops_reading_the_body_is_504_not_a_hang() {
    let origin = Origin::start("o").await.unwrap();
    let cfg = simple(&origin.url(), "timeouts = { response_header = \"500ms\" }").replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\"]\nlimits = { max_request_body = \"64MiB\" }",
    );
    let e = TestEdge::start(&cfg).await;
    // /hang never reads the body: once socket buffers fill, the upload stops making progress.
    let body = vec![7u8; 32 * 1024 * 1024];
    let t = Instant::now();
    let r = client().post(e.url("/hang")).body(body).send().await;
    match r {
        Ok(r) => {
            assert_eq!(r.status(), 504);
            assert_eq!(r.headers()["x-rampart-reason"], "UPSTREAM_HEADER_TIMEOUT");
        }
        // The edge may answer before the client finished writing and close the connection.
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_long_steady_upload_is_not_a_header_timeout() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "timeouts = { response_header = \"300ms\" }")).await;
    // 8 chunks, 100ms apart: 800ms of upload against a 300ms header timeout.
    let chunks = futures_util::stream::unfold(0, |i| async move {
        if i == 8 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(vec![1u8; 1000]), i + 1))
    });
    let r = client()
        .post(e.url("/echo"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["body_length"], 8000);
}

#[tokio::test]
async fn ipv6_host_patterns_match_bracketed_hosts() {
    let origin = Origin::start("v6").await.unwrap();
    let cfg = simple(&origin.url(), "").replace("default = true", "hosts = [\"::1\"]");
    let e = TestEdge::start(&cfg).await;
    let r = client()
        .get(e.url("/"))
        .header("host", "[::1]:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-origin-name"], "v6");
}

/// The lines of a raw response head whose name is `name`, in any case.
fn lines_named<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter(|l| l.split_once(':').is_some_and(|(k, _)| k.eq_ignore_ascii_case(name)))
        .collect()
}

#[tokio::test]
async fn upstream_response_fields_pass_whole_and_the_proxy_s_own_are_set_once() {
    // On the lean path (no explaining, no cache) fields the pipeline has no use for
    // pass as the lines they came in; the rest go through the map as before. A
    // `Connection` naming a field puts every field in the map, for the removal.
    const HEAD: &str = "HTTP/1.1 200 OK\r\nServer: Mine\r\nDate: Mon, 02 Jan 2006 15:04:05 GMT\r\n\
        X-Mixed-Case: Value  \r\nVia: 1.0 upstream\r\nX-Request-Id: upstream-id\r\nSet-Cookie: a=1\r\n\
        Set-Cookie: b=2\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\nX-Last: z\r\n";
    let plain = Origin::raw(const_str(&[HEAD, "Connection: keep-alive\r\n\r\nok"]))
        .await
        .unwrap();
    let naming = Origin::raw(const_str(&[
        HEAD,
        "Connection: keep-alive, x-private\r\nX-Private: secret\r\n\r\nok",
    ]))
    .await
    .unwrap();
    for (origin, explain) in [(&plain, false), (&plain, true), (&naming, false)] {
        let site = if explain { "explain = true" } else { "" };
        let (_e, mut s) = edge_and_connection(
            origin,
            Parts {
                site,
                ..Parts::default()
            },
        )
        .await;
        for _ in 0..2 {
            // Twice on one connection: it stays usable after a passed-through head.
            tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                .await
                .unwrap();
            let (head, body) = read_response(&mut s).await;
            assert_eq!(body, b"ok");
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            let one = |name: &str| {
                let l = lines_named(&head, name);
                assert_eq!(l.len(), 1, "one {name} (explain {explain}): {head}");
                l[0].split_once(':').unwrap().1.trim().to_string()
            };
            assert_eq!(one("date"), "Mon, 02 Jan 2006 15:04:05 GMT", "the upstream's Date kept");
            assert_eq!(one("server"), "Mine");
            assert_eq!(one("x-mixed-case"), "Value");
            assert_eq!(one("x-last"), "z");
            assert_eq!(one("via"), "1.0 upstream, 1.1 rampart");
            assert_eq!(one("content-length"), "2");
            assert_ne!(one("x-request-id"), "upstream-id", "ours replaces the upstream's");
            assert_eq!(lines_named(&head, "set-cookie").len(), 2);
            // Nothing else: the hop-by-hop fields (and the one `Connection` names) gone.
            let mut names = field_names(&head);
            names.retain(|n| !n.starts_with("x-rampart-"));
            let expected = [
                "content-length",
                "date",
                "server",
                "set-cookie",
                "set-cookie",
                "via",
                "x-last",
                "x-mixed-case",
                "x-request-id",
            ];
            assert_eq!(names, expected, "{head}");
        }
    }
}

#[tokio::test]
async fn the_proxy_s_own_response_fields_ride_with_passed_lines() {
    // No upstream Via or x-request-id: the proxy's are written after the passed
    // lines, once each (and no Via when `via = false`).
    let origin = Origin::raw(b"HTTP/1.1 200 OK\r\nServer: Mine\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    for via in [true, false] {
        let server = if via { "" } else { "via = false" };
        let (_e, mut s) = edge_and_connection(
            &origin,
            Parts {
                server,
                ..Parts::default()
            },
        )
        .await;
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut s).await;
        assert_eq!(body, b"ok");
        let names = field_names(&head);
        let mut expected = vec!["content-length", "date", "server", "x-request-id"];
        if via {
            expected.push("via");
            assert_eq!(lines_named(&head, "via"), ["via: 1.1 rampart"]);
        }
        expected.sort();
        assert_eq!(names, expected, "{head}");
        let id = lines_named(&head, "x-request-id")[0]
            .split_once(": ")
            .unwrap()
            .1
            .to_string();
        assert_eq!(id.len(), 32, "a generated id: {head}");
    }
}

/// An edge in front of `origin` (one pool, the given parts), and a connection to it.
async fn edge_and_connection(origin: &Origin, parts: Parts<'_>) -> (TestEdge, tokio::net::TcpStream) {
    let e = TestEdge::start(&one_pool(&[&origin.url()], parts)).await;
    let s = tokio::net::TcpStream::connect(e.edge().http_addrs()[0]).await.unwrap();
    (e, s)
}

/// The field names of a raw response head, lower-case and sorted.
fn field_names(head: &str) -> Vec<String> {
    let mut names: Vec<String> = head
        .lines()
        .skip(1)
        .filter_map(|l| Some(l.split_once(':')?.0.to_ascii_lowercase()))
        .collect();
    names.sort();
    names
}

/// Join `parts` into a string that lives for the rest of the test run.
fn const_str(parts: &[&str]) -> &'static [u8] {
    parts.concat().leak().as_bytes()
}

/// `server.reuse_port`: a second edge listens on the first one's address and the
/// kernel spreads new connections over both; without it, the second cannot start.
#[tokio::test]
async fn edges_with_reuse_port_share_an_address() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let config = |origin: &Origin, listen: &str| {
        one_pool(
            &[&origin.url()],
            Parts {
                server: "reuse_port = true",
                ..Parts::default()
            },
        )
        .replace("listen = [\"127.0.0.1:0\"]", &format!("listen = [\"{listen}\"]"))
    };
    let first = TestEdge::start(&config(&a, "127.0.0.1:0")).await;
    let addr = first.http;
    let second = TestEdge::start(&config(&b, &addr.to_string())).await;
    assert_eq!(second.http, addr);

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let answer = raw(
            addr,
            b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        seen.insert(if answer.contains("hello from a") { "a" } else { "b" });
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "new connections reach both edges");

    let without = config(&b, &addr.to_string()).replace("reuse_port = true", "");
    let dir = temp_dir();
    let path = dir.join("rampart.toml");
    std::fs::write(&path, &without).unwrap();
    let v = rampart_config::load_file(&path).unwrap();
    let err = rampart_edge::Edge::start(v, Some(path))
        .await
        .err()
        .expect("the address is taken");
    assert!(err.to_string().contains("cannot listen on"), "{err}");
}
