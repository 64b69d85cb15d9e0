//! Admin listener, metrics, access log and configuration reload over real sockets.

use crate::common::*;
use rampart_testkit::Origin;
use std::time::Duration;

fn with_admin(backend: &str, admin_extra: &str) -> String {
    format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n{admin_extra}\n",
        simple(backend, "")
    )
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&with_admin(&origin.url(), "")).await;
    let c = client();
    assert_eq!(c.get(e.admin("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(
        c.get(e.admin("/readyz")).send().await.unwrap().text().await.unwrap(),
        "ready\n"
    );
    for _ in 0..3 {
        c.get(e.url("/")).send().await.unwrap().bytes().await.unwrap();
    }
    c.get(e.url("/status/503")).send().await.unwrap().bytes().await.unwrap();
    let m = e.metrics().await;
    assert!(
        m.contains(r#"rampart_requests_total{site="default",route="/",class="2xx"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"rampart_requests_total{site="default",route="/",class="5xx"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"rampart_request_duration_seconds_count{site="default",route="/"} 4"#),
        "{m}"
    );
    assert!(m.contains("rampart_open_connections{listener=\"http://"), "{m}");
    assert!(
        m.contains(r#"rampart_response_body_bytes_total{site="default",route="/"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"rampart_upstream_errors_total{pool="app",reason="UPSTREAM_CONNECT_REFUSED"} 0"#),
        "{m}"
    );
    for line in m.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(line.starts_with("rampart_"), "unprefixed metric: {line}");
    }
}

#[tokio::test]
async fn upstream_errors_are_counted_by_reason() {
    let dead = rampart_testkit::closed_port().await.unwrap();
    let e = TestEdge::start(&with_admin(&format!("http://{dead}"), "")).await;
    let c = client();
    assert_eq!(c.get(e.url("/")).send().await.unwrap().status(), 502);
    let m = e.metrics().await;
    // The default policy retries a connect failure once: two failed exchanges, one retry.
    assert!(
        m.contains(r#"rampart_upstream_errors_total{pool="app",reason="UPSTREAM_CONNECT_REFUSED"} 2"#),
        "{m}"
    );
    assert!(m.contains(r#"rampart_upstream_retries_total{pool="app"} 1"#), "{m}");
}

#[tokio::test]
async fn admin_api_needs_the_bearer_token() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start_with_token(&with_admin(&origin.url(), "token = \"file:token\""), "t0ps3cret\n").await;
    let c = client();
    let r = c.get(e.admin("/admin/status")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = c
        .get(e.admin("/admin/status"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c.post(e.admin("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let s: serde_json::Value = c
        .get(e.admin("/admin/status"))
        .bearer_auth("t0ps3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["config"]["version"], 1);
    assert_eq!(s["config"]["hash"].as_str().unwrap().len(), 16);
    assert_eq!(s["ready"], true);
    assert!(s["uptime_seconds"].is_u64());
    assert_eq!(s["listeners"][0]["kind"], "http");

    let cfg = c
        .get(e.admin("/admin/config"))
        .bearer_auth("t0ps3cret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!cfg.contains("t0ps3cret"), "secret leaked: {cfg}");
    assert!(cfg.contains("<redacted>"));
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(c.get(e.admin("/metrics")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn without_a_token_mutations_are_refused() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&with_admin(&origin.url(), "")).await;
    let c = client();
    assert_eq!(c.get(e.admin("/admin/status")).send().await.unwrap().status(), 200);
    let r = c.post(e.admin("/admin/reload")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("no admin token"));
}

async fn reload(e: &TestEdge) -> (u16, serde_json::Value) {
    let r = client()
        .post(e.admin("/admin/reload"))
        .bearer_auth("t0ps3cret")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn reload_swaps_config_and_a_bad_config_changes_nothing() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let admin = "token = \"file:token\"";
    let e = TestEdge::start_with_token(&with_admin(&a.url(), admin), "t0ps3cret\n").await;
    let c = client();
    assert_eq!(c.get(e.url("/")).send().await.unwrap().headers()["x-origin-name"], "a");

    // A bad config: rejected with field paths, the running config keeps serving.
    let bad = with_admin(&b.url(), admin).replace("pool = \"app\"", "pool = \"ap\"");
    e.rewrite_config(&bad);
    let (status, body) = reload(&e).await;
    assert_eq!(status, 400);
    assert_eq!(body["ok"], false);
    assert_eq!(
        body["errors"][0],
        r#"site[0].route[0].pool: no pool named "ap" (did you mean "app"?)"#
    );
    assert_eq!(c.get(e.url("/")).send().await.unwrap().headers()["x-origin-name"], "a");

    e.rewrite_config("this is [not toml");
    let (status, body) = reload(&e).await;
    assert_eq!(status, 400);
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("TOML syntax error at line 1")
    );

    // A good config: swapped in.
    e.rewrite_config(&with_admin(&b.url(), admin));
    let (status, body) = reload(&e).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2, "rejected configs take no version");
    assert_eq!(c.get(e.url("/")).send().await.unwrap().headers()["x-origin-name"], "b");

    let m = e.metrics().await;
    assert!(m.contains(r#"rampart_config_reloads_total{result="failure"} 2"#), "{m}");
    assert!(m.contains(r#"rampart_config_reloads_total{result="success"} 1"#), "{m}");
}

#[tokio::test]
async fn requests_in_flight_finish_on_the_old_config() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let admin = "token = \"file:token\"";
    let e = TestEdge::start_with_token(&with_admin(&a.url(), admin), "t0ps3cret\n").await;
    let slow = tokio::spawn({
        let url = e.url("/slow?chunks=5&interval=100ms");
        async move {
            let r = client().get(url).send().await.unwrap();
            let name = r.headers()["x-origin-name"].to_str().unwrap().to_string();
            (name, r.text().await.unwrap())
        }
    });
    // Wait until the slow request has reached origin a.
    assert!(eventually(|| a.requests() == 1, Duration::from_secs(5)).await);
    e.rewrite_config(&with_admin(&b.url(), admin));
    assert_eq!(reload(&e).await.0, 200);
    assert_eq!(
        client().get(e.url("/")).send().await.unwrap().headers()["x-origin-name"],
        "b"
    );
    let (name, body) = slow.await.unwrap();
    assert_eq!(name, "a");
    assert_eq!(body.lines().count(), 5);
}

#[tokio::test]
async fn reload_adds_and_removes_listeners() {
    let a = Origin::start("a").await.unwrap();
    let admin = "token = \"file:token\"";
    let e = TestEdge::start_with_token(&with_admin(&a.url(), admin), "t0ps3cret\n").await;
    let first = e.http;
    // Add a second listener on a port chosen now, then drop the first.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let two = with_admin(&a.url(), admin).replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:0\", \"127.0.0.1:{port}\"]"),
    );
    e.rewrite_config(&two);
    assert_eq!(reload(&e).await.0, 200);
    let r = client().get(format!("http://127.0.0.1:{port}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        client().get(e.url("/")).send().await.unwrap().status(),
        200,
        "first listener kept"
    );

    let only_second = with_admin(&a.url(), admin).replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:{port}\"]"),
    );
    e.rewrite_config(&only_second);
    assert_eq!(reload(&e).await.0, 200);
    assert_eq!(
        e.edge().http_addrs(),
        vec![format!("127.0.0.1:{port}").parse().unwrap()]
    );
    let gone = eventually(
        || std::net::TcpStream::connect_timeout(&first, Duration::from_millis(200)).is_err(),
        Duration::from_secs(5),
    )
    .await;
    assert!(gone, "removed listener still accepts");
}

#[tokio::test]
async fn reload_that_cannot_bind_changes_nothing() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let admin = "token = \"file:token\"";
    let e = TestEdge::start_with_token(&with_admin(&a.url(), admin), "t0ps3cret\n").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = with_admin(&b.url(), admin).replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:0\", \"127.0.0.1:{port}\"]"),
    );
    e.rewrite_config(&cfg);
    let (status, body) = reload(&e).await;
    assert_eq!(status, 400);
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("server.listen[1]: cannot listen on"),
        "{body}"
    );
    assert_eq!(
        client().get(e.url("/")).send().await.unwrap().headers()["x-origin-name"],
        "a"
    );
}

#[tokio::test]
async fn access_log_has_one_json_line_per_request() {
    let origin = Origin::start("o").await.unwrap();
    let cfg = simple(&origin.url(), "").replace("access = \"off\"", "access = \"access.log\"");
    let e = TestEdge::start(&cfg).await;
    let r = client()
        .get(e.url("/status/404?x=1"))
        .header("host", "logged.test")
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    r.bytes().await.unwrap();
    let path = e.dir.join("access.log");
    let found = eventually(
        || std::fs::read_to_string(&path).map(|s| s.contains(&id)).unwrap_or(false),
        Duration::from_secs(5),
    )
    .await;
    assert!(found, "no access log line");
    let text = std::fs::read_to_string(&path).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["request_id"], id.as_str());
    assert_eq!(line["status"], 404);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/status/404");
    assert_eq!(line["host"], "logged.test");
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert_eq!(line["upstream"], origin.url().as_str());
    assert_eq!(line["reason"], "PROXIED");
    assert_eq!(line["route"], "/");
    assert!(line["bytes_out"].as_u64().unwrap() > 0);
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
}

/// The request ids logged in the access log file `name` of edge `e`.
fn logged_ids(e: &TestEdge, name: &str) -> Vec<String> {
    std::fs::read_to_string(e.dir.join(name))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["request_id"].as_str().map(str::to_string))
        .collect()
}

async fn logged_request(e: &TestEdge) -> String {
    let r = client().get(e.url("/")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    r.bytes().await.unwrap();
    id
}

#[tokio::test]
async fn reload_moves_the_access_log_and_keeps_an_unchanged_one() {
    let origin = Origin::start("o").await.unwrap();
    let logged_to = |file: &str| {
        with_admin(&origin.url(), "token = \"file:token\"").replace("access = \"off\"", &format!("access = \"{file}\""))
    };
    let e = TestEdge::start_with_token(&logged_to("one.log"), "t0ps3cret\n").await;
    let first = logged_request(&e).await;
    // The same target: the running log is kept, and keeps logging.
    e.rewrite_config(&logged_to("one.log"));
    assert_eq!(reload(&e).await.0, 200);
    let second = logged_request(&e).await;
    // A new target: later requests go there, none to the old file.
    e.rewrite_config(&logged_to("two.log"));
    assert_eq!(reload(&e).await.0, 200);
    let third = logged_request(&e).await;
    let all_there = eventually(
        || logged_ids(&e, "one.log").len() == 2 && logged_ids(&e, "two.log").len() == 1,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        all_there,
        "{:?} {:?}",
        logged_ids(&e, "one.log"),
        logged_ids(&e, "two.log")
    );
    assert_eq!(logged_ids(&e, "one.log"), vec![first, second]);
    assert_eq!(logged_ids(&e, "two.log"), vec![third]);
}

#[tokio::test]
async fn reload_cannot_remove_or_move_the_admin_listener() {
    let a = Origin::start("a").await.unwrap();
    let admin = "token = \"file:token\"";
    let e = TestEdge::start_with_token(&with_admin(&a.url(), admin), "t0ps3cret\n").await;
    e.rewrite_config(&simple(&a.url(), ""));
    let (status, body) = reload(&e).await;
    assert_eq!(status, 400);
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("admin.listen: the admin listener cannot be added, moved or removed"),
        "{body}"
    );
    // Still protected by the running token.
    assert_eq!(
        client().get(e.admin("/admin/status")).send().await.unwrap().status(),
        401
    );
}

const SCOPED: &str = r#"
max_auth_failures = 3
auth_lockout = "60s"
tokens = [
  { name = "ops", token = "write-secret", scope = "write" },
  { name = "grafana", token = "read-secret", scope = "read" },
]
"#;

async fn admin_get(e: &TestEdge, path: &str, token: &str) -> u16 {
    client()
        .get(e.admin(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn token_scopes_and_the_audit_log() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&with_admin(&origin.url(), SCOPED)).await;
    assert_eq!(admin_get(&e, "/admin/status", "read-secret").await, 200);
    assert_eq!(admin_get(&e, "/admin/status", "write-secret").await, 200);
    assert_eq!(admin_get(&e, "/admin/status", "").await, 401);
    let (status, body) = e.admin_post("/admin/reload", "read-secret", "").await;
    assert_eq!(status, 403);
    assert!(body["error"].as_str().unwrap().contains("read scope"), "{body}");
    assert_eq!(e.admin_post("/admin/reload", "write-secret", "").await.0, 200);
    // Every mutation is in the audit log, under the token's name.
    let audit = e.admin_json("/admin/audit", Some("read-secret")).await;
    assert_eq!(audit["audit"][0]["operator"], "ops");
    assert_eq!(audit["audit"][0]["action"], "config-reload");
    // The secrets never show in the config view.
    let cfg = e.admin_json("/admin/config", Some("read-secret")).await.to_string();
    assert!(!cfg.contains("write-secret") && !cfg.contains("read-secret"), "{cfg}");
}

#[tokio::test]
async fn failed_authentication_locks_the_client_out() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&with_admin(&origin.url(), SCOPED)).await;
    for _ in 0..3 {
        assert_eq!(admin_get(&e, "/admin/status", "guess").await, 401);
    }
    // Locked out now, even with a valid token.
    let r = client()
        .get(e.admin("/admin/status"))
        .bearer_auth("write-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Health and metrics stay available.
    assert_eq!(client().get(e.admin("/healthz")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn metrics_can_be_restricted_to_networks() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&with_admin(&origin.url(), "metrics_allow = [\"10.0.0.0/8\"]")).await;
    assert_eq!(client().get(e.admin("/metrics")).send().await.unwrap().status(), 403);
    let e = TestEdge::start(&with_admin(&origin.url(), "metrics_allow = [\"127.0.0.0/8\", \"::1\"]")).await;
    assert_eq!(client().get(e.admin("/metrics")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_signal_reload_is_audited_too() {
    let origin = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&with_admin(&origin.url(), SCOPED)).await;
    e.edge().reload().await.unwrap();
    let audit = e.admin_json("/admin/audit", Some("read-secret")).await;
    assert_eq!(audit["audit"][0]["operator"], "signal");
    assert_eq!(audit["audit"][0]["action"], "config-reload");
}
