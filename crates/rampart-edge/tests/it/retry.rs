//! Retries: conditions, idempotency, body replay bound, per-try timeout, budget.

use crate::common::*;
use rampart_testkit::{Origin, closed_port};
use std::time::{Duration, Instant};

fn config(a: &str, b: &str, pool_extra: &str, route_extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
[log]
access = "off"
[[pool]]
name = "app"
backends = ["{a}", "{b}"]
outlier = {{ enabled = false }}
{pool_extra}
[[site]]
default = true
explain = true
  [[site.route]]
  path = "/"
  pool = "app"
  {route_extra}
"#
    )
}

#[tokio::test]
async fn connect_failures_are_retried_on_another_backend() {
    let dead = closed_port().await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let e = TestEdge::start(&config(&format!("http://{dead}"), &b.url(), "", "")).await;
    let mut retried = 0;
    for _ in 0..10 {
        let r = client().get(e.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let attempts = r.headers()["x-rampart-attempts"].to_str().unwrap().to_string();
        if attempts.contains(',') {
            assert_eq!(attempts, "app#0:UPSTREAM_CONNECT_REFUSED,app#1:SUCCESS");
            retried += 1;
        } else {
            assert_eq!(attempts, "app#1:SUCCESS");
        }
    }
    assert_eq!(
        retried, 5,
        "round-robin sends every other first attempt to the dead backend"
    );
}

#[tokio::test]
async fn non_idempotent_requests_are_retried_only_when_the_route_opts_in() {
    let dead = closed_port().await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let e = TestEdge::start(&config(&format!("http://{dead}"), &b.url(), "", "")).await;
    let statuses: Vec<u16> = futures_util::future::join_all((0..4).map(|_| async {
        client()
            .post(e.url("/echo"))
            .body("x")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }))
    .await;
    assert_eq!(statuses.iter().filter(|s| **s == 502).count(), 2, "{statuses:?}");

    let e = TestEdge::start(&config(
        &format!("http://{dead}"),
        &b.url(),
        "",
        "retry_non_idempotent = true",
    ))
    .await;
    for _ in 0..4 {
        let r = client().post(e.url("/echo")).body("hello").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let j: serde_json::Value = r.json().await.unwrap();
        assert_eq!(j["body_length"], 5, "the body was replayed whole");
    }
}

#[tokio::test]
async fn status_retries_replay_the_body_up_to_the_bound() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    a.set_status("/echo", Some(503));
    let pool = r#"retry = { retries = 1, on = ["503"], replay_limit = "1KiB" }"#;
    let e = TestEdge::start(&config(&a.url(), &b.url(), pool, "retry_non_idempotent = true")).await;
    // Small bodies are kept and replayed: every request ends on b.
    for _ in 0..4 {
        let r = client()
            .post(e.url("/echo"))
            .body(vec![b'x'; 1000])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let attempts = r.headers()["x-rampart-attempts"].to_str().unwrap().to_string();
        assert!(
            attempts == "app#1:SUCCESS" || attempts == "app#0:503,app#1:SUCCESS",
            "{attempts}"
        );
        let j: serde_json::Value = r.json().await.unwrap();
        assert_eq!(j["body_length"], 1000);
    }
    // A body past the replay bound streams and is not retried: a's 503 reaches the client.
    let mut got_503 = 0;
    for _ in 0..4 {
        let r = client()
            .post(e.url("/echo"))
            .body(vec![b'x'; 4000])
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            got_503 += 1;
            assert_eq!(r.headers()["x-rampart-attempts"], "app#0:503");
        }
    }
    assert_eq!(got_503, 2);
}

#[tokio::test]
async fn per_try_timeout_moves_on_to_the_next_backend() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    a.set_hang("/", true);
    let pool = r#"retry = { retries = 1, on = ["timeout"], per_try_timeout = "200ms" }
timeouts = { response_header = "10s" }"#;
    let e = TestEdge::start(&config(&a.url(), &b.url(), pool, "")).await;
    for _ in 0..2 {
        let t = Instant::now();
        let r = client().get(e.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-origin-name"], "b");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
    assert_eq!(a.requests(), 1, "a hung once, then b answered");
}

#[tokio::test]
async fn the_retry_budget_caps_retries() {
    let dead = closed_port().await.unwrap();
    let b = Origin::start("b").await.unwrap();
    // No percentage, a floor of 1 retry per second: at most 10 retries in 10 seconds.
    let pool = r#"retry = { retries = 1, budget_percent = 0, budget_min_per_second = 1 }"#;
    let e = TestEdge::start(&config(&format!("http://{dead}"), &b.url(), pool, "")).await;
    let mut failed = 0;
    for _ in 0..60 {
        if client().get(e.url("/")).send().await.unwrap().status() == 502 {
            failed += 1;
        }
    }
    let m = e.metrics().await;
    assert!(m.contains(r#"rampart_upstream_retries_total{pool="app"} 10"#), "{m}");
    assert!(failed >= 10, "without budget the failures are not retried: {failed}");
}

#[tokio::test]
async fn retries_zero_means_one_attempt() {
    let dead = closed_port().await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let e = TestEdge::start(&config(
        &format!("http://{dead}"),
        &b.url(),
        "retry = { retries = 0 }",
        "",
    ))
    .await;
    let statuses: Vec<u16> = futures_util::future::join_all(
        (0..4).map(|_| async { client().get(e.url("/")).send().await.unwrap().status().as_u16() }),
    )
    .await;
    assert_eq!(statuses.iter().filter(|s| **s == 502).count(), 2, "{statuses:?}");
}
