//! The HTTP/1 upstream pool: connections reused per backend, given back only after
//! a whole response, and upstream-closed connections replaced without an error.

use crate::common::*;
use rampart_testkit::Origin;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "")).await;
    let c = client();
    for _ in 0..20 {
        let r = c.get(e.url("/status/200")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(origin.requests(), 20);
    assert_eq!(origin.connections(), 1, "one pooled connection served all");
}

#[tokio::test]
async fn a_connection_whose_response_was_cut_short_is_not_reused() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "")).await;
    let r = client().get(e.url("/status/200")).send().await.unwrap();
    r.bytes().await.unwrap();
    assert_eq!(origin.connections(), 1);
    // The client leaves in the middle of a slow body: that upstream connection
    // still has bytes of it coming, so it must not serve another request.
    {
        let mut s = tokio::net::TcpStream::connect(e.http).await.unwrap();
        s.write_all(b"GET /slow?chunks=20&interval=50ms HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
    }
    let r = client().get(e.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["path"], "/echo", "a whole, right answer on a clean connection");
    assert_eq!(origin.connections(), 2, "the cut connection was dropped");
}

/// A reused connection that closes after a request went out, before any answer:
/// the upstream may have acted on it, so only an idempotent request is sent again
/// (once, on a new connection). A POST gets 502; its body reached the origin once.
#[tokio::test]
async fn a_request_the_upstream_dropped_is_sent_again_only_when_idempotent() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "retry = { retries = 0 }")).await;
    let c = client();
    let warm = |c: reqwest::Client| {
        let url = e.url("/echo");
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    };
    warm(c.clone()).await;
    assert_eq!(origin.connections(), 1);

    // A POST with a small body: on the pooled connection, which the origin drops.
    let r = c.post(e.url("/drop")).body("once").send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(header_str(&r, "x-rampart-reason"), "UPSTREAM_RESET");
    let drops = |o: &Origin| o.paths().iter().filter(|p| *p == "/drop").count();
    assert_eq!(drops(&origin), 1, "sent once");

    // A PUT on a pooled connection: sent again on a new one, dropped there too.
    warm(c.clone()).await;
    let conns = origin.connections();
    let r = c.put(e.url("/drop")).body("twice").send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(drops(&origin), 3, "sent on the pooled connection, then on a new one");
    assert_eq!(origin.connections(), conns + 1);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced_without_an_error() {
    // One answer per connection, then the origin closes it without saying so: the
    // connection the edge pooled goes stale while idle.
    let origin = Origin::raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "")).await;
    let c = client();
    for i in 1..=3u64 {
        let r = c.get(e.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        // One attempt: the stale connection was never tried, not failed and retried.
        let attempts = header_str(&r, "x-rampart-attempts");
        assert_eq!(attempts, "app#0:SUCCESS", "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
        // Let the origin close the connection the edge just pooled.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(origin.connections(), i);
    }
}

#[tokio::test]
async fn an_idle_upstream_connection_is_closed_after_the_pool_idle_timeout() {
    // An origin that keeps connections open and reports when the edge closes one.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => {
                            let _ = closed_tx.send(std::time::Instant::now());
                            return;
                        }
                    }
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        buf.clear();
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    }
                }
            });
        }
    });
    let e = TestEdge::start(&simple(&format!("http://{addr}"), "idle_timeout = \"1s\"")).await;
    let r = client().get(e.url("/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    let idle_from = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(6), closed_rx.recv())
        .await
        .expect("the idle connection was closed")
        .unwrap();
    let idle = closed.duration_since(idle_from);
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(4),
        "closed after {idle:?} idle"
    );
}

/// The edge's own HTTP/1 client (body-less GET and HEAD) against hand-written answers.
mod own_client {
    use super::*;

    async fn get(origin: &'static [u8], method: reqwest::Method) -> (u16, String, reqwest::header::HeaderMap, String) {
        let origin = Origin::raw(origin).await.unwrap();
        let e = TestEdge::start(&simple(&origin.url(), "")).await;
        let r = client().request(method, e.url("/x")).send().await.unwrap();
        let status = r.status().as_u16();
        let reason = header_str(&r, "x-rampart-reason").to_string();
        let headers = r.headers().clone();
        (status, reason, headers, r.text().await.unwrap())
    }

    #[tokio::test]
    async fn chunked_with_extensions_and_trailers() {
        let (status, _, _, body) = get(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 1\r\n\r\n",
            reqwest::Method::GET,
        )
        .await;
        assert_eq!((status, body.as_str()), (200, "hello world"));
    }

    #[tokio::test]
    async fn a_body_delimited_by_close() {
        let (status, _, _, body) = get(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end",
            reqwest::Method::GET,
        )
        .await;
        assert_eq!((status, body.as_str()), (200, "until the end"));
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (status, _, _, body) = get(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            reqwest::Method::GET,
        )
        .await;
        assert_eq!((status, body.as_str()), (201, "ok"));
    }

    #[tokio::test]
    async fn a_head_answer_has_no_body_but_keeps_its_length() {
        let (status, _, headers, body) = get(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n",
            reqwest::Method::HEAD,
        )
        .await;
        assert_eq!((status, body.as_str()), (200, ""));
        assert_eq!(headers["content-length"], "1234");
    }

    #[tokio::test]
    async fn broken_answers_are_502_invalid_response() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"SPDY/3 200 OK\r\n\r\n",
        ] {
            let (status, reason, _, _) = get(answer, reqwest::Method::GET).await;
            assert_eq!(
                (status, reason.as_str()),
                (502, "UPSTREAM_INVALID_RESPONSE"),
                "{:?}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn a_close_inside_a_length_body_is_not_a_whole_response() {
        // Five bytes promised, two sent, then the origin closes.
        let origin = Origin::raw(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok")
            .await
            .unwrap();
        let e = TestEdge::start(&simple(&origin.url(), "")).await;
        // Whether the head went out before the body failed depends on timing; a
        // whole, successful response never does.
        match client().get(e.url("/x")).send().await {
            Ok(r) => assert!(r.bytes().await.is_err(), "the client sees the body cut short"),
            Err(e) => assert!(e.is_request() || e.is_body(), "{e:?}"),
        }
    }
}
