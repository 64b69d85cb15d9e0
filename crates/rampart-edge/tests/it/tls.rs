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
