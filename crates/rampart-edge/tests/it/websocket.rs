//! WebSocket (HTTP/1.1 Upgrade) tunnelled both ways, with an idle timeout.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use rampart_testkit::Origin;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn websocket_echo_through_the_edge() {
    let origin = Origin::start("ws").await.unwrap();
    let e = TestEdge::start(&simple(&origin.url(), "")).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", e.http))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().contains_key("x-request-id"));
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m, Message::text(format!("hello {i}")));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m, Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let origin = Origin::start("ws").await.unwrap();
    let cfg = simple(&origin.url(), "").replace(
        "pool = \"app\"\n",
        "pool = \"app\"\n  tunnel_idle_timeout = \"300ms\"\n",
    );
    let e = TestEdge::start(&cfg).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", e.http))
        .await
        .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    assert!(ws.next().await.unwrap().is_ok());
    let t = tokio::time::Instant::now();
    // Silence: the edge closes the tunnel after 300ms; the stream ends (or errors).
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap();
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    assert!(t.elapsed() >= Duration::from_millis(250), "{:?}", t.elapsed());
}

#[tokio::test]
async fn upgrades_are_not_forwarded_when_the_route_disables_them() {
    let origin = Origin::start("ws").await.unwrap();
    let cfg = simple(&origin.url(), "").replace("pool = \"app\"\n", "pool = \"app\"\n  websocket = false\n");
    let e = TestEdge::start(&cfg).await;
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws", e.http)).await;
    assert!(err.is_err(), "handshake must fail when upgrades are off");
}

#[tokio::test]
async fn shutdown_waits_for_open_tunnels_until_the_deadline() {
    let origin = Origin::start("ws").await.unwrap();
    let mut e = TestEdge::start(&simple(&origin.url(), "")).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", e.http))
        .await
        .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    assert!(ws.next().await.unwrap().is_ok());
    let t = tokio::time::Instant::now();
    let report = e.edge.take().unwrap().shutdown(Duration::from_millis(300)).await;
    assert_eq!(report.abandoned, 1, "the open tunnel is counted");
    assert!(t.elapsed() >= Duration::from_millis(300));
}

type H2WebSocket = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Open a WebSocket over HTTP/2 (RFC 8441: extended CONNECT with `:protocol`) on
/// an h2c connection to the edge; the status of the CONNECT and the stream.
async fn h2_websocket(addr: std::net::SocketAddr, path: &str) -> (u16, Option<H2WebSocket>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    h2_websocket_on(tcp, &format!("http://{addr}{path}")).await
}

/// [`h2_websocket`] on a connection already open (h2c, or TLS with ALPN `h2`), to `url`.
pub(crate) async fn h2_websocket_on<I>(io: I, url: &str) -> (u16, Option<H2WebSocket>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(url)
        .version(hyper::Version::HTTP_2)
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    if status != 200 {
        return (status, None);
    }
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    (status, Some(ws))
}

#[tokio::test]
async fn websocket_over_http2_is_tunnelled_to_an_http1_upstream() {
    let origin = Origin::start("ws").await.unwrap();
    let cfg = simple(&origin.url(), "").replace("[server]\n", "[server]\nh2c = true\n");
    let e = TestEdge::start(&cfg).await;
    let (status, ws) = h2_websocket(e.http, "/ws").await;
    assert_eq!(status, 200, "the tunnel opens with a 2xx to the CONNECT");
    let mut ws = ws.unwrap();
    for i in 0..3 {
        ws.send(Message::text(format!("over h2 {i}"))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m, Message::text(format!("over h2 {i}")));
    }
    ws.close(None).await.unwrap();

    // A route without WebSockets refuses the CONNECT.
    let off = cfg.replace("pool = \"app\"\n", "pool = \"app\"\n  websocket = false\n");
    let e = TestEdge::start(&off).await;
    assert_eq!(h2_websocket(e.http, "/ws").await.0, 405);
}
