//! The security pipeline over raw sockets: request framing, normalisation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
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
/// (`reason` when the edge itself explains the refusal; hyper's own 400s carry none).
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
        if let Some(r) = reason {
            assert!(text.contains(&format!("x-rampart-reason: {r}")), "{name}: {text}");
            assert!(text.contains("\"detail\":"), "{name}: {text}");
            assert!(text.contains("x-request-id: "), "{name}: {text}");
        }
    }
    assert_eq!(o.requests(), 0, "nothing reached the origin");
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
    let metrics = client()
        .get(e.admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
