//! TLS towards clients: certificates chosen by SNI, HTTP/2 via ALPN, HTTPS redirects.

use crate::common::*;
use rampart_testkit::Origin;
use std::path::Path;

/// Write a self-signed certificate for `names` as `{stem}.pem` / `{stem}.key`; return the PEM.
fn self_signed(dir: &Path, stem: &str, names: &[&str]) -> String {
    let ck = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let pem = ck.cert.pem();
    std::fs::write(dir.join(format!("{stem}.pem")), &pem).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), ck.signing_key.serialize_pem()).unwrap();
    pem
}

fn tls_config(backend: &str, site_extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
[server.tls]
listen = ["127.0.0.1:0"]
certificates = [{{ cert = "a.pem", key = "a.key" }}, {{ cert = "b.pem", key = "b.key" }}]
[log]
access = "off"
[[pool]]
name = "app"
backends = ["{backend}"]
[[site]]
default = true
{site_extra}
  [[site.route]]
  path = "/"
  pool = "app"
"#
    )
}

struct Tls {
    edge: TestEdge,
    a_pem: String,
    b_pem: String,
}

async fn start(backend: &str, site_extra: &str) -> Tls {
    let dir = temp_dir();
    let a_pem = self_signed(&dir, "a", &["a.test"]);
    let b_pem = self_signed(&dir, "b", &["b.test", "*.b.test"]);
    let edge = TestEdge::start_in(dir, &tls_config(backend, site_extra)).await;
    Tls { edge, a_pem, b_pem }
}

/// A client that trusts only `pem` and resolves `host` to the TLS listener.
fn client_trusting(t: &Tls, pem: &str, host: &str, h2: bool) -> reqwest::Client {
    let addr = t.edge.edge().tls_addrs()[0];
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve(host, addr);
    if !h2 {
        b = b.http1_only();
    }
    b.build().unwrap()
}

fn https(t: &Tls, host: &str, path: &str) -> String {
    format!("https://{host}:{}{path}", t.edge.edge().tls_addrs()[0].port())
}

#[tokio::test]
async fn sni_picks_the_certificate_and_alpn_offers_http2() {
    let origin = Origin::start("o").await.unwrap();
    let t = start(&origin.url(), "").await;

    let r = client_trusting(&t, &t.a_pem, "a.test", true)
        .get(https(&t, "a.test", "/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(j["headers"]["via"][0], "2 rampart");
    assert_eq!(j["version"], "HTTP/1.1", "the upstream hop is HTTP/1.1");

    let r = client_trusting(&t, &t.b_pem, "x.b.test", true)
        .get(https(&t, "x.b.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "wildcard certificate chosen for x.b.test");

    // A client trusting only b's certificate cannot talk to a.test: a's certificate was served.
    let wrong = client_trusting(&t, &t.b_pem, "a.test", true)
        .get(https(&t, "a.test", "/"))
        .send()
        .await;
    assert!(wrong.is_err());

    let r = client_trusting(&t, &t.a_pem, "a.test", false)
        .get(https(&t, "a.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
}

#[tokio::test]
async fn plain_http_redirects_to_https_with_308() {
    let origin = Origin::start("o").await.unwrap();
    let t = start(&origin.url(), "https_redirect = true\nhttps_port = 8443").await;
    let r = client()
        .get(t.edge.url("/some/path?q=1&r=2"))
        .header("host", "a.test:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "https://a.test:8443/some/path?q=1&r=2");
    assert_eq!(origin.requests(), 0);
    // Over TLS the same site is proxied.
    let r = client_trusting(&t, &t.a_pem, "a.test", true)
        .get(https(&t, "a.test", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn bad_certificates_are_config_errors_with_paths() {
    let dir = temp_dir();
    self_signed(&dir, "a", &["a.test"]);
    self_signed(&dir, "b", &["b.test"]);
    // b.key does not belong to a.pem.
    let cfg = tls_config("http://127.0.0.1:1", "").replace(
        r#"{ cert = "a.pem", key = "a.key" }"#,
        r#"{ cert = "a.pem", key = "b.key" }"#,
    );
    std::fs::write(dir.join("rampart.toml"), &cfg).unwrap();
    let v = rampart_config::load_file(&dir.join("rampart.toml")).unwrap();
    let e = rampart_edge::check(v).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert!(
        e.to_string()
            .starts_with("server.tls.certificates[0].key: does not match the certificate"),
        "{e}"
    );

    std::fs::write(dir.join("a.pem"), "not a certificate").unwrap();
    let v = rampart_config::load_file(&dir.join("rampart.toml")).unwrap();
    let e = rampart_edge::check(v).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("server.tls.certificates[0].cert: no certificate in"),
        "{e}"
    );

    let missing = tls_config("http://127.0.0.1:1", "").replace("a.pem", "missing.pem");
    std::fs::write(dir.join("rampart.toml"), missing).unwrap();
    let e = rampart_config::load_file(&dir.join("rampart.toml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("server.tls.certificates[0].cert: no such file"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn upstream_tls_is_verified_against_the_configured_ca() {
    // An edge with a TLS listener serves as the TLS upstream of a second edge.
    let origin = Origin::start("deep").await.unwrap();
    let front_tls = start(&origin.url(), "").await;
    let upstream = format!("https://127.0.0.1:{}", front_tls.edge.edge().tls_addrs()[0].port());
    let dir = temp_dir();
    std::fs::write(dir.join("ca.pem"), &front_tls.a_pem).unwrap();

    // Verified with the CA and the SNI name the certificate carries.
    let ok = simple(&upstream, "tls = { ca = \"ca.pem\", sni = \"a.test\" }");
    let e = TestEdge::start_in(dir.clone(), &ok).await;
    let r = client().get(e.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-origin-name"], "deep");

    // Without the right SNI name, verification fails: 502 UPSTREAM_TLS_ERROR.
    let dir2 = temp_dir();
    std::fs::write(dir2.join("ca.pem"), &front_tls.a_pem).unwrap();
    let bad = simple(&upstream, "tls = { ca = \"ca.pem\" }");
    let e2 = TestEdge::start_in(dir2, &bad).await;
    let r = client().get(e2.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-rampart-reason"], "UPSTREAM_TLS_ERROR");

    // `insecure` skips verification (labs only).
    let e3 = TestEdge::start(&simple(&upstream, "tls = { insecure = true }")).await;
    assert_eq!(client().get(e3.url("/")).send().await.unwrap().status(), 200);
}

/// A TLS client connection to the edge's TLS listener, trusting `pem`, offering
/// only `http/1.1` in ALPN.
async fn tls_connect(t: &Tls, pem: &str, host: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_with(t, pem, host, rustls::crypto::ring::default_provider(), b"http/1.1").await
}

async fn tls_connect_with(
    t: &Tls,
    pem: &str,
    host: &str,
    provider: rustls::crypto::CryptoProvider,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    roots.add(der).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(t.edge.edge().tls_addrs()[0])
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The server's suite order wins: a client that lists AES-256-GCM first (as
/// rustls and OpenSSL do) gets the cheaper AES-128-GCM, and a client offering
/// only ChaCha20-Poly1305 (TLS 1.3 or 1.2) still gets it.
#[tokio::test]
async fn server_prefers_aes_128_gcm_and_keeps_the_other_suites() {
    use rustls::CipherSuite as S;
    let origin = Origin::start("o").await.unwrap();
    let t = start(&origin.url(), "").await;
    let default = rustls::crypto::ring::default_provider();
    assert_eq!(default.cipher_suites[0].suite(), S::TLS13_AES_256_GCM_SHA384);
    let s = tls_connect(&t, &t.a_pem, "a.test").await;
    let suite = s.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(suite, S::TLS13_AES_128_GCM_SHA256);

    for (only, version) in [
        (S::TLS13_CHACHA20_POLY1305_SHA256, &rustls::version::TLS13),
        (
            S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            &rustls::version::TLS12,
        ),
    ] {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites.retain(|s| s.suite() == only);
        let s = tls_connect_with(&t, &t.a_pem, "a.test", p, b"http/1.1").await;
        let conn = s.get_ref().1;
        assert_eq!(conn.negotiated_cipher_suite().unwrap().suite(), only);
        assert_eq!(conn.protocol_version(), Some(version.version));
    }
}

/// WebSocket over HTTP/2 (RFC 8441) on a TLS connection that chose `h2` by ALPN,
/// which hyper's HTTP/2 connection serves alone.
#[tokio::test]
async fn websocket_over_http2_over_tls_is_tunnelled() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let origin = Origin::start("ws").await.unwrap();
    let t = start(&origin.url(), "").await;
    let s = tls_connect_with(&t, &t.a_pem, "a.test", rustls::crypto::ring::default_provider(), b"h2").await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, ws) = crate::websocket::h2_websocket_on(s, "https://a.test/ws").await;
    assert_eq!(status, 200);
    let mut ws = ws.unwrap();
    ws.send(Message::text("over h2 and TLS")).await.unwrap();
    let m = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m, Message::text("over h2 and TLS"));
    ws.close(None).await.unwrap();
}

/// `config` with an admin listener (for the parked gauge) and `server` fields.
async fn start_with_admin(backend: &str, server: &str) -> Tls {
    let dir = temp_dir();
    let a_pem = self_signed(&dir, "a", &["a.test"]);
    let b_pem = self_signed(&dir, "b", &["b.test", "*.b.test"]);
    let config = tls_config(backend, "")
        .replace("[server.tls]", &format!("{server}\n[server.tls]"))
        .replace("[log]", "[admin]\nlisten = \"127.0.0.1:0\"\n[log]");
    let edge = TestEdge::start_in(dir, &config).await;
    Tls { edge, a_pem, b_pem }
}

async fn until_parked(e: &TestEdge, n: u64) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(6);
    while std::time::Instant::now() < end {
        if e.parked().await == n {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// HTTP/1.1 over TLS takes the plain HTTP/1 path: requests without a body on the
/// lean server, one with a body through hyper and back, and an idle connection
/// keeps only its TLS session until the client sends again.
#[tokio::test]
async fn http1_over_tls_is_parked_when_idle_and_served_again() {
    use tokio::io::AsyncWriteExt;
    let origin = Origin::start("o").await.unwrap();
    let t = start_with_admin(&origin.url(), "").await;
    let mut s = tls_connect(&t, &t.a_pem, "a.test").await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert!(until_parked(&t.edge, 1).await, "a new TLS connection waits parked");

    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["headers"]["x-forwarded-proto"][0], "https");
    assert!(until_parked(&t.edge, 1).await, "parked after its request");

    // A request with a body goes to hyper; the connection comes back after it.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["body_length"], 5);
    assert!(until_parked(&t.edge, 1).await, "parked after hyper served it");

    // Two pipelined requests in one write, after the park.
    s.write_all(b"GET /status/204 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /echo HTTP/1.1\r\nHost: a.test\r\nX-Probe: second\r\n\r\n")
        .await
        .unwrap();
    let (first, rest) = read_head(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 204"), "{first}");
    assert!(rest.is_empty() || rest.starts_with(b"HTTP/1.1 200"));
    let mut s2 = Prefixed { first: rest, s: &mut s };
    let (second, body) = read_response(&mut s2).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(String::from_utf8_lossy(&body).contains("second"));
    assert_eq!(origin.requests(), 4);

    // A body sent in pauses arrives whole.
    let r = client_trusting(&t, &t.a_pem, "a.test", false)
        .get(https(&t, "a.test", "/slow?chunks=3&interval=50ms"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.text().await.unwrap(), "chunk 0\nchunk 1\nchunk 2\n");

    drop(s);
    assert!(
        until_parked(&t.edge, 0).await,
        "closed connections leave nothing parked"
    );
}

/// Bytes read before the stream's own (what `read_head` read past a head).
struct Prefixed<'a, S> {
    first: Vec<u8>,
    s: &'a mut S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first[..n]);
            self.first.drain(..n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut *self.s).poll_read(cx, buf)
    }
}

/// An idle TLS connection is closed at the keep-alive deadline with a
/// `close_notify` (a clean end for the client), and at once by shutdown.
#[tokio::test]
async fn idle_tls_connections_close_cleanly_at_the_deadline_and_on_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("o").await.unwrap();
    let mut t = start_with_admin(&origin.url(), "header_read_timeout = \"1s\"").await;
    let mut s = tls_connect(&t, &t.a_pem, "a.test").await;
    s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0))), "a clean close (close_notify): {n:?}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    let mut s = tls_connect(&t, &t.a_pem, "a.test").await;
    s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut s).await;
    assert!(until_parked(&t.edge, 1).await);
    let start = std::time::Instant::now();
    let report = t
        .edge
        .edge
        .take()
        .unwrap()
        .shutdown(std::time::Duration::from_secs(10))
        .await;
    assert_eq!(report.abandoned, 0);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0))), "closed: {n:?}");
}

/// A WebSocket over TLS (`wss://`, HTTP/1.1): the upgrade is handed to hyper from
/// the lean path and tunnelled both ways.
#[tokio::test]
async fn websocket_over_tls_is_tunnelled() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let origin = Origin::start("o").await.unwrap();
    let t = start_with_admin(&origin.url(), "").await;
    let s = tls_connect(&t, &t.a_pem, "a.test").await;
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://a.test/ws", s).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over tls")).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back, Message::text("over tls"));
    ws.close(None).await.unwrap();
}
