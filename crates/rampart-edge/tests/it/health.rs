//! Active and passive health, panic mode and the ejection cap, over real sockets.

use crate::common::*;
use rampart_testkit::{Origin, closed_port};
use std::time::Duration;

fn config(a: &str, b: &str, pool_extra: &str) -> String {
    one_pool(
        &[a, b],
        Parts {
            admin: Some(""),
            pool: pool_extra,
            ..Parts::default()
        },
    )
}

const FAST_CHECKS: &str = r#"outlier = { enabled = false }
health = { path = "/", interval = "50ms", jitter = "0", timeout = "200ms", consecutive_up = 2, consecutive_down = 2 }"#;

async fn backend(e: &TestEdge, i: usize) -> serde_json::Value {
    let p = e.admin_json("/admin/pools", None).await;
    p["pools"][0]["backends"][i].clone()
}

async fn wait_for<F: Fn(&serde_json::Value) -> bool>(e: &TestEdge, i: usize, f: F) -> serde_json::Value {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let b = backend(e, i).await;
        if f(&b) {
            return b;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "backend {i} never reached the state: {b}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(e: &TestEdge) -> String {
    e.metrics().await
}

#[tokio::test]
async fn active_checks_take_a_dead_backend_out_and_bring_it_back() {
    let dead = closed_port().await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let e = TestEdge::start(&config(&format!("http://{dead}"), &b.url(), FAST_CHECKS)).await;
    let st = wait_for(&e, 0, |b| b["healthy"] == false).await;
    assert_eq!(st["active_check"], "failing");
    // Every request now goes to the healthy backend: no errors at all.
    for _ in 0..20 {
        let r = client().get(e.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-origin-name"], "b");
    }
    let m = metrics(&e).await;
    let dead_url = format!("http://{dead}");
    assert!(
        m.contains(&format!(
            "rampart_backend_healthy{{pool=\"app\",backend=\"{dead_url}\"}} 0"
        )),
        "{m}"
    );
    assert!(m.contains(&format!(
        "rampart_backend_health_transitions_total{{pool=\"app\",backend=\"{dead_url}\",check=\"active\",to=\"unhealthy\"}} 1"
    )));

    // The backend comes back on the same address: healthy again after consecutive_up checks.
    let revived = Origin::start_at(dead, "a").await.unwrap();
    wait_for(&e, 0, |b| b["healthy"] == true).await;
    let mut names = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = client().get(e.url("/")).send().await.unwrap();
        names.insert(r.headers()["x-origin-name"].to_str().unwrap().to_string());
    }
    assert_eq!(names.len(), 2, "both backends serve again");
    assert!(
        revived.paths().iter().any(|p| p == "/"),
        "the check requested the configured path"
    );
}

#[tokio::test]
async fn auto_path_finds_the_first_endpoint_that_answers() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    a.set_status("/health", Some(404));
    for p in ["/health", "/healthz", "/status", "/ping"] {
        b.set_status(p, Some(503));
    }
    let checks = FAST_CHECKS.replace("path = \"/\"", "path = \"auto\"");
    let e = TestEdge::start(&config(&a.url(), &b.url(), &checks)).await;
    wait_for(&e, 1, |b| b["healthy"] == false).await;
    assert_eq!(backend(&e, 0).await["healthy"], true);
    // a: /health failed, /healthz answered 2xx, and from then on only /healthz is checked.
    assert!(eventually(|| a.paths().len() >= 4, Duration::from_secs(5)).await);
    let tried = a.paths();
    assert_eq!(tried[..2], ["/health".to_string(), "/healthz".to_string()], "{tried:?}");
    assert!(tried[2..].iter().all(|p| p == "/healthz"), "{tried:?}");
    // b: every candidate was tried, in order.
    let b_tried = b.paths();
    assert_eq!(
        b_tried[..4],
        ["/health", "/healthz", "/status", "/ping"].map(String::from),
        "{b_tried:?}"
    );
}

#[tokio::test]
async fn tcp_checks() {
    let dead = closed_port().await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let checks = FAST_CHECKS.replace("path = \"/\",", "kind = \"tcp\",");
    let e = TestEdge::start(&config(&format!("http://{dead}"), &b.url(), &checks)).await;
    wait_for(&e, 0, |b| b["healthy"] == false).await;
    assert_eq!(backend(&e, 1).await["healthy"], true);
    assert_eq!(b.requests(), 0, "a TCP check sends no HTTP request");
}

#[tokio::test]
async fn passive_checks_eject_a_failing_backend_then_half_open_trials_close_it() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    a.set_status("/", Some(503));
    let outlier = r#"outlier = { consecutive_failures = 3, ejection_time = "400ms", max_ejection_time = "10s", success_threshold = 2 }"#;
    let e = TestEdge::start(&config(&a.url(), &b.url(), outlier)).await;
    let mut failures = 0;
    for _ in 0..30 {
        if client().get(e.url("/")).send().await.unwrap().status() == 503 {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "ejected after three failures in a row");
    assert_eq!(a.requests(), 3);
    let st = backend(&e, 0).await;
    assert_eq!(st["circuit"], "open");
    assert_eq!(st["healthy"], false);
    assert!(metrics(&e).await.contains(&format!(
        "rampart_backend_health_transitions_total{{pool=\"app\",backend=\"{}\",check=\"passive\",to=\"ejected\"}} 1",
        a.url()
    )));

    // The backend recovers; after the ejection time, trial requests close the circuit.
    a.set_status("/", None);
    wait_for(&e, 0, |b| b["circuit"] == "half_open").await;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while backend(&e, 0).await["circuit"] != "closed" {
        assert!(tokio::time::Instant::now() < end);
        assert_eq!(client().get(e.url("/")).send().await.unwrap().status(), 200);
    }
    assert_eq!(backend(&e, 0).await["healthy"], true);
}

#[tokio::test]
async fn the_ejection_cap_keeps_half_the_pool() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    a.set_status("/", Some(502));
    b.set_status("/", Some(502));
    let outlier = r#"outlier = { consecutive_failures = 2, ejection_time = "30s" }"#;
    let e = TestEdge::start(&config(&a.url(), &b.url(), outlier)).await;
    for _ in 0..20 {
        client().get(e.url("/")).send().await.unwrap();
    }
    let open = [backend(&e, 0).await, backend(&e, 1).await]
        .iter()
        .filter(|b| b["circuit"] == "open")
        .count();
    assert_eq!(open, 1, "max_ejected_percent = 50 ejects one of two");
}

#[tokio::test]
async fn panic_mode_serves_from_unhealthy_backends_rather_than_nothing() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    // Both fail their health check, but both can serve.
    a.set_status("/hc", Some(500));
    b.set_status("/hc", Some(500));
    let checks = FAST_CHECKS.replace("path = \"/\"", "path = \"/hc\"");
    let e = TestEdge::start(&config(&a.url(), &b.url(), &checks)).await;
    wait_for(&e, 0, |b| b["healthy"] == false).await;
    wait_for(&e, 1, |b| b["healthy"] == false).await;
    for _ in 0..10 {
        assert_eq!(client().get(e.url("/")).send().await.unwrap().status(), 200);
    }
    let p = e.admin_json("/admin/pools", None).await;
    assert_eq!(p["pools"][0]["panic"], true);
    assert!(
        metrics(&e)
            .await
            .contains("rampart_pool_panic_requests_total{pool=\"app\"} 10")
    );
}

#[tokio::test]
async fn health_state_survives_a_reload() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    a.set_status("/hc", Some(500));
    let checks = |interval: &str| {
        format!(
            r#"outlier = {{ enabled = false }}
health = {{ path = "/hc", interval = "{interval}", jitter = "0", timeout = "200ms", consecutive_up = 2, consecutive_down = 1 }}"#
        )
    };
    let e = TestEdge::start(&config(&a.url(), &b.url(), &checks("50ms"))).await;
    wait_for(&e, 0, |b| b["healthy"] == false).await;
    // a's check passes from now on, but a rebuilt pool's checker needs two passes 60s
    // apart to call it healthy: only the state kept across the reload keeps a out now.
    a.set_status("/hc", None);
    std::fs::write(e.dir.join("rampart.toml"), config(&a.url(), &b.url(), &checks("60s"))).unwrap();
    assert!(e.edge().reload().await.is_ok());
    assert!(
        eventually(
            || a.paths().iter().filter(|p| *p == "/hc").count() >= 2,
            Duration::from_secs(5)
        )
        .await
    );
    assert_eq!(backend(&e, 0).await["healthy"], false);
    for _ in 0..5 {
        assert_eq!(
            client().get(e.url("/")).send().await.unwrap().headers()["x-origin-name"],
            "b"
        );
    }
    // Removing the checks altogether puts the backend back in service.
    std::fs::write(
        e.dir.join("rampart.toml"),
        config(&a.url(), &b.url(), "outlier = { enabled = false }"),
    )
    .unwrap();
    assert!(e.edge().reload().await.is_ok());
    assert_eq!(backend(&e, 0).await["healthy"], true);
    assert_eq!(backend(&e, 0).await["active_check"], "none");
}

#[tokio::test]
async fn a_backend_seen_down_and_back_is_not_kept_out_by_its_circuit() {
    let a = Origin::start("a").await.unwrap();
    let addr = a.addr();
    let b = Origin::start("b").await.unwrap();
    a.set_status("/", Some(503));
    let cfg = r#"outlier = { consecutive_failures = 1, ejection_time = "60s", max_ejection_time = "10m" }
retry = { retries = 0 }
health = { kind = "tcp", interval = "50ms", jitter = "0", timeout = "200ms", consecutive_up = 2, consecutive_down = 1 }"#;
    let e = TestEdge::start(&config(&a.url(), &b.url(), cfg)).await;
    // a answers 503: ejected by passive checks for 60s, while its TCP checks still pass.
    for _ in 0..4 {
        client().get(e.url("/")).send().await.unwrap();
    }
    wait_for(&e, 0, |b| b["circuit"] == "open" && b["active_check"] == "passing").await;
    // a goes away (active checks fail), then comes back on the same address.
    drop(a);
    wait_for(&e, 0, |b| b["active_check"] == "failing").await;
    let _back = Origin::start_at(addr, "a").await.unwrap();
    let st = wait_for(&e, 0, |b| b["active_check"] == "passing").await;
    assert_eq!(
        st["circuit"], "closed",
        "seen down and back: not held out for the rest of the 60s ejection"
    );
    assert_eq!(st["healthy"], true);
}
