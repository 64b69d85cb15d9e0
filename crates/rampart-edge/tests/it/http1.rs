//! Rampart's own HTTP/1.1 server path (body-less requests, and small bodies that
//! come with their head) answers as hyper's would, and hands a connection to hyper
//! mid-stream for what it does not serve.

use crate::common::*;
use rampart_testkit::Origin;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn edge(origin: &Origin, server: &str) -> TestEdge {
    TestEdge::start(&one_pool(
        &[&origin.url()],
        Parts {
            server,
            pool: "timeouts = { response_header = \"60s\" }",
            admin: Some(""),
            ..Parts::default()
        },
    ))
    .await
}

fn has_field(head: &str, field: &str) -> bool {
    head.to_ascii_lowercase().lines().any(|l| l.trim_end() == field)
}

/// Split a reply read to its end into head and body.
fn split(reply: &str) -> (&str, &str) {
    reply.split_once("\r\n\r\n").unwrap_or((reply, ""))
}

#[tokio::test]
async fn http10_clients_get_http10_answers_and_keep_alive_only_when_asked() {
    let origin = Origin::start("o").await.unwrap();
    let e = edge(&origin, "").await;
    // Without keep-alive: an HTTP/1.0 answer, then the connection closes.
    let reply = raw(
        e.http,
        b"GET /status/200 HTTP/1.0\r\nHost: t\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let (head, body) = split(&reply);
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("keep-alive"), "{head}");
    assert_eq!(body, "status 200 from o\n");
    // With keep-alive: said back, and the connection serves the next request.
    let mut s = TcpStream::connect(e.http).await.unwrap();
    let get = b"GET /status/200 HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n";
    for _ in 0..2 {
        s.write_all(get).await.unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(has_field(&head, "connection: keep-alive"), "{head}");
        assert_eq!(body, b"status 200 from o\n");
    }
    // A body of unknown length cannot be chunked for HTTP/1.0: it ends at close.
    let reply = raw(
        e.http,
        b"GET /slow?chunks=3&interval=10ms HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let (head, body) = split(&reply);
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("content-length"), "{head}");
    assert_eq!(body, "chunk 0\nchunk 1\nchunk 2\n");
}

#[tokio::test]
async fn connection_close_is_answered_and_honoured() {
    let origin = Origin::start("o").await.unwrap();
    let e = edge(&origin, "").await;
    let reply = raw(
        e.http,
        b"GET /status/200 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /status/201 HTTP/1.1\r\nHost: t\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let (head, body) = split(&reply);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(has_field(head, "connection: close"), "{head}");
    assert!(has_field(head, "content-length: 18"), "{head}");
    assert!(head.to_ascii_lowercase().contains("\r\ndate: "), "{head}");
    assert!(head.to_ascii_lowercase().contains("\r\nx-request-id: "), "{head}");
    assert_eq!(body, "status 200 from o\n", "nothing after the closing answer");
    assert_eq!(origin.requests(), 1);
}

/// Read a chunked body to its end: the data.
async fn read_chunked(s: &mut TcpStream, mut buf: Vec<u8>) -> Vec<u8> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(5).position(|w| w == b"0\r\n\r\n")
            && (end == 0 || buf[..end].ends_with(b"\r\n"))
        {
            buf.truncate(end + 5);
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("the body in time")
            .unwrap();
        assert!(n > 0, "closed inside a chunked body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut data = Vec::new();
    let mut rest = &buf[..];
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            assert_eq!(rest, b"\r\n", "no trailers, nothing after the body");
            return data;
        }
        data.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n");
        rest = &rest[size + 2..];
    }
}

#[tokio::test]
async fn bodies_of_unknown_length_are_chunked_and_the_connection_goes_on() {
    let origin = Origin::start("o").await.unwrap();
    let e = edge(&origin, "").await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /slow?chunks=3&interval=10ms HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let (head, rest) = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(has_field(&head, "transfer-encoding: chunked"), "{head}");
        let body = read_chunked(&mut s, rest).await;
        assert_eq!(body, b"chunk 0\nchunk 1\nchunk 2\n");
    }
}

#[tokio::test]
async fn head_204_and_304_answers_carry_no_body() {
    let origin = Origin::start("o").await.unwrap();
    let e = edge(&origin, "").await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    // Each answer is followed by a GET on the same connection: a stray body byte
    // would be read as the start of the next response.
    for (request, status) in [
        ("HEAD /status/200", "200"),
        ("GET /status/204", "204"),
        ("GET /status/304", "304"),
    ] {
        s.write_all(format!("{request} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, rest) = read_head(&mut s).await;
        assert!(rest.is_empty(), "no body after {request}: {rest:?}");
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        if status == "200" {
            assert!(has_field(&head, "content-length: 18"), "HEAD keeps the length: {head}");
        } else {
            assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
        }
        s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "after {request}: {head}");
        assert_eq!(body, b"status 200 from o\n");
    }
}

#[tokio::test]
async fn requests_with_bodies_go_to_hyper_mid_connection_and_come_back() {
    let origin = Origin::start("o").await.unwrap();
    let e = edge(&origin, "").await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    // Pipelined: a lean GET, a POST with a body (whole: lean too), a lean GET again.
    s.write_all(
        b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Probe: one\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: t\r\nX-Probe: two\r\nContent-Length: 5\r\n\r\nhello\
          GET /echo HTTP/1.1\r\nHost: t\r\nX-Probe: three\r\n\r\n",
    )
    .await
    .unwrap();
    for (probe, length) in [("one", 0), ("two", 5), ("three", 0)] {
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["headers"]["x-probe"][0], probe, "{j}");
        assert_eq!(j["body_length"], length, "{j}");
    }
    // A chunked upload, then a plain GET once more.
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await
    .unwrap();
    let (_, body) = read_response(&mut s).await;
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["body_length"], 3, "{j}");
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, b"status 200 from o\n");
    assert_eq!(origin.requests(), 5);
}

/// A small body that arrives with its head is served on the lean path and sent
/// upstream by the own client, behind its head, on the connection body-less
/// requests use; one that is still on its way, or too large to hold, is streamed
/// by hyper. Either way the origin gets the same bytes and length.
#[tokio::test]
async fn small_bodies_with_their_head_are_sent_whole_and_the_rest_streamed() {
    let origin = Origin::start("o").await.unwrap();
    let e = edge(&origin, "limits = { max_request_body = \"32KiB\" }").await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    // Pipelined behind a GET: a POST with its body, an empty PUT, a GET.
    s.write_all(
        b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world\
          PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n\
          GET /echo HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await
    .unwrap();
    for (method, body, length) in [
        ("GET", None, None),
        ("POST", Some("hello world"), Some("11")),
        ("PUT", Some(""), Some("0")),
        ("GET", None, None),
    ] {
        let (head, reply) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let j: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(j["method"], method, "{j}");
        assert_eq!(j["body"], body.unwrap_or(""), "{j}");
        assert_eq!(j["headers"]["content-length"][0].as_str(), length, "{j}");
        assert!(j["headers"]["transfer-encoding"].is_null(), "{j}");
    }
    // The own client carried them all on one upstream connection.
    assert_eq!(origin.connections(), 1);

    // A head whose body follows in pieces, as over a real network: waited for,
    // and sent whole by the own client on the same upstream connection.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\n")
        .await
        .unwrap();
    for piece in [&b"lat"[..], b"er", b" piece"] {
        tokio::time::sleep(Duration::from_millis(30)).await;
        s.write_all(piece).await.unwrap();
    }
    let (_, reply) = read_response(&mut s).await;
    let j: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(j["body"], "later piece", "{j}");
    assert_eq!(origin.connections(), 1);

    // Larger than the lean path holds (16 KiB), and within the limit.
    let big = "x".repeat(20 * 1024);
    let req = format!(
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{big}",
        big.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (_, reply) = read_response(&mut s).await;
    let j: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(j["body_length"], big.len(), "{j}");
    assert_eq!(j["body"], big.as_str());

    // A body slower than the lean path waits for (the client body timeout, here
    // 500 ms, when shorter than a second) is handed to hyper, which streams it.
    let slow = edge(&origin, "client_body_timeout = \"500ms\"").await;
    let mut s2 = TcpStream::connect(slow.http).await.unwrap();
    s2.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nsl")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(750)).await;
    s2.write_all(b"ow").await.unwrap();
    let (head, reply) = read_response(&mut s2).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let j: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(j["body"], "slow", "{j}");

    // Over the limit: 413 before any upstream is asked, whole body or not.
    let before = origin.requests();
    let mut s = TcpStream::connect(e.http).await.unwrap();
    let over = "y".repeat(10);
    let req = format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 40000\r\n\r\n{over}");
    s.write_all(req.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
    assert_eq!(origin.requests(), before);
}

/// The `rampart_open_connections` gauge of the edge's HTTP listener.
async fn open_connections(e: &TestEdge) -> u64 {
    let m = e.metrics().await;
    let label = format!("listener=\"http://{}\"", e.http);
    m.lines()
        .filter(|l| l.starts_with("rampart_open_connections{") && l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_client_that_goes_away_abandons_its_request() {
    let origin = Origin::start("o").await.unwrap();
    let e = edge(&origin, "").await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    s.write_all(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    assert!(eventually(|| origin.requests() == 1, Duration::from_secs(5)).await);
    assert_eq!(open_connections(&e).await, 1);
    // The upstream would keep it waiting for a minute; the client leaves now.
    drop(s);
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    while open_connections(&e).await != 0 {
        assert!(
            tokio::time::Instant::now() < end,
            "the connection was kept for its request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
