//! Idle HTTP/1 keep-alive connections are parked (only the socket kept, no HTTP
//! state) and serve their next request; partial heads and timeouts are unchanged.

use crate::common::*;
use rampart_testkit::Origin;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn until_parked(e: &TestEdge, n: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < end {
        if e.parked().await == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn config(origin: &Origin, server: &str) -> String {
    one_pool(
        &[&origin.url()],
        Parts {
            server,
            admin: Some(""),
            ..Parts::default()
        },
    )
}

const GET: &[u8] = b"GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test]
async fn an_idle_keep_alive_connection_is_parked_and_serves_its_next_requests() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&origin, "")).await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    // A connection waiting for its first request holds no HTTP state either.
    assert!(until_parked(&e, 1).await, "a new connection waits parked");
    s.write_all(GET).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(until_parked(&e, 1).await, "the idle connection was parked");
    // The same socket serves the next request, and two pipelined ones.
    s.write_all(GET).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
    assert!(until_parked(&e, 1).await, "parked again");
    let mut two = GET.to_vec();
    two.extend_from_slice(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Probe: second\r\n\r\n");
    s.write_all(&two).await.unwrap();
    let (first, _) = read_response(&mut s).await;
    let (second, body) = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200") && second.starts_with("HTTP/1.1 200"));
    assert!(
        String::from_utf8_lossy(&body).contains("second"),
        "the second request arrived whole"
    );
    assert_eq!(origin.requests(), 4);
    // A client that closes a parked connection leaves nothing behind.
    assert!(until_parked(&e, 1).await);
    drop(s);
    assert!(until_parked(&e, 0).await, "the closed connection is gone");
}

#[tokio::test]
async fn a_request_body_and_a_partial_head_are_never_parked() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&origin, "header_read_timeout = \"2500ms\"")).await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    // Half a body: the request is in flight, the connection stays with hyper.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(e.parked().await, 0);
    s.write_all(b"world").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["body_length"], 10, "{echo}");
    // Half a head: not parked (which would restart the header timer); hyper's
    // header timeout still closes the connection.
    s.write_all(b"GET /status/200 HTTP/1.1\r\nHo").await.unwrap();
    let start = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut rest)).await;
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(6),
        "closed by the header timeout, after {waited:?}"
    );
    assert_eq!(e.parked().await, 0);
}

#[tokio::test]
async fn a_parked_connection_closes_at_the_keep_alive_limit() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&origin, "header_read_timeout = \"2500ms\"")).await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    s.write_all(GET).await.unwrap();
    read_response(&mut s).await;
    let idle_from = Instant::now();
    assert!(until_parked(&e, 1).await);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut rest)).await;
    let idle = idle_from.elapsed();
    assert!(
        rest.is_empty(),
        "closed without a word: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(
        idle >= Duration::from_millis(1400) && idle < Duration::from_millis(6000),
        "closed after {idle:?} idle"
    );
    assert!(until_parked(&e, 0).await);
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let origin = Origin::start("o").await.unwrap();
    let mut e = TestEdge::start(&config(&origin, "")).await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    s.write_all(GET).await.unwrap();
    read_response(&mut s).await;
    assert!(until_parked(&e, 1).await);
    let start = Instant::now();
    let report = e.edge.take().unwrap().shutdown(Duration::from_secs(10)).await;
    assert_eq!(report.abandoned, 0);
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0))), "closed: {n:?}");
}

/// Shutdown reaches connections the lean server holds, not only parked ones: one
/// waiting for its next request (before the park tick) and one halfway through a
/// head are closed at once.
#[tokio::test]
async fn shutdown_closes_connections_between_requests_and_in_a_head() {
    let origin = Origin::start("o").await.unwrap();
    let mut e = TestEdge::start(&config(&origin, "")).await;
    let mut waiting = TcpStream::connect(e.http).await.unwrap();
    waiting.write_all(GET).await.unwrap();
    read_response(&mut waiting).await;
    let mut partial = TcpStream::connect(e.http).await.unwrap();
    partial.write_all(GET).await.unwrap();
    read_response(&mut partial).await;
    partial.write_all(b"GET /status/200 HTTP/1.1\r\nHo").await.unwrap();
    let start = Instant::now();
    let report = e.edge.take().unwrap().shutdown(Duration::from_secs(10)).await;
    assert_eq!(report.abandoned, 0);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), waiting.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0))), "closed: {n:?}");
    // Closed with a head half read: an end or a reset, either way at once.
    let n = tokio::time::timeout(Duration::from_secs(2), partial.read_to_end(&mut rest)).await;
    let closed = matches!(&n, Ok(Ok(0))) || matches!(&n, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset);
    assert!(closed, "closed: {n:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
}

#[tokio::test]
async fn many_parked_connections_wake_together_and_never_sending_ones_expire() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&origin, "header_read_timeout = \"3s\"")).await;
    let mut conns = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(e.http).await.unwrap();
        s.write_all(GET).await.unwrap();
        read_response(&mut s).await;
        conns.push(s);
    }
    assert!(until_parked(&e, 40).await, "all 40 parked");
    // All wake in the same moment: the lot hands each its own task again.
    for s in &mut conns {
        s.write_all(GET).await.unwrap();
    }
    for s in &mut conns {
        let (head, _) = read_response(s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    assert_eq!(origin.requests(), 80);
    assert!(until_parked(&e, 40).await, "parked again");
    // Closing half leaves the other half parked.
    conns.truncate(20);
    assert!(until_parked(&e, 20).await, "the closed ones left the lot");
    // A connection that never sends a request is closed at its deadline.
    let mut silent = TcpStream::connect(e.http).await.unwrap();
    let opened = Instant::now();
    assert!(until_parked(&e, 21).await);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(8), silent.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0))), "closed without a word: {n:?}");
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6),
        "closed after {waited:?}"
    );
}

#[tokio::test]
async fn a_head_trickled_byte_by_byte_is_closed_at_the_header_timeout() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&origin, "header_read_timeout = \"1500ms\"")).await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    let opened = Instant::now();
    // A byte every 100 ms never lets the connection look quiet, and never ends the head.
    let head =
        b"GET /status/200 HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut one = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut one)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => panic!("an answer to half a head"),
            Err(_) => {}
        }
    }
    let waited = opened.elapsed();
    assert!(closed, "still open after {waited:?}");
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_millis(3500),
        "closed after {waited:?}"
    );
    assert_eq!(origin.requests(), 0);
}

#[tokio::test]
async fn a_pipelined_partial_head_behind_a_slow_response_is_not_timed_out() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&origin, "header_read_timeout = \"1s\"")).await;
    let mut s = TcpStream::connect(e.http).await.unwrap();
    // The response takes longer than the header timeout; the next head waits
    // behind it, incomplete. Its time starts when the response is done.
    s.write_all(b"GET /status/200?delay=1800ms HTTP/1.1\r\nHost: t\r\n\r\nGET /status/200 HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The rest of the second head, in time: answered on the same connection.
    s.write_all(b"st: t\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(origin.requests(), 2);
}
