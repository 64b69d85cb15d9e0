//! Session affinity, fallback pools.

use crate::common::*;
use rampart_testkit::{Origin, closed_port};
use std::time::Duration;

fn config(backends: &[String], pool_extra: &str, tail: &str) -> String {
    let list: Vec<&str> = backends.iter().map(String::as_str).collect();
    one_pool(
        &list,
        Parts {
            admin: Some("token = \"file:token\""),
            pool: &format!("{pool_extra}\n{tail}"),
            site: "explain = true",
            ..Parts::default()
        },
    )
}

async fn get(e: &TestEdge, headers: &[(&str, &str)]) -> (String, Option<String>) {
    let mut r = client().get(e.url("/"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let origin = r.headers()["x-origin-name"].to_str().unwrap().to_string();
    let cookie = r.headers().get("set-cookie").map(|v| v.to_str().unwrap().to_string());
    (origin, cookie)
}

fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

async fn act(e: &TestEdge, backend: usize, action: &str) {
    let path = format!("/admin/pools/app/backends/{backend}/{action}");
    assert_eq!(e.admin_post(&path, "tok", "").await.0, 200);
}

#[tokio::test]
async fn cookie_affinity_pins_and_cannot_be_forged() {
    let o: Vec<Origin> = futures_util::future::join_all((0..3).map(|i| Origin::start(["a", "b", "c"][i])))
        .await
        .into_iter()
        .map(|o| o.unwrap())
        .collect();
    let urls: Vec<String> = o.iter().map(|o| o.url()).collect();
    let e = TestEdge::start_with_token(
        &config(
            &urls,
            "affinity = { mode = \"cookie\", ttl = \"10m\", secure = true, same_site = \"Strict\" }",
            "",
        ),
        "tok",
    )
    .await;

    let (first, cookie) = get(&e, &[]).await;
    let cookie = cookie.expect("a new session gets a cookie");
    assert!(cookie.starts_with("rampart_affinity="), "{cookie}");
    assert!(
        cookie.contains("Max-Age=600")
            && cookie.contains("Secure")
            && cookie.contains("SameSite=Strict")
            && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    for u in &urls {
        let addr = u.trim_start_matches("http://");
        assert!(!cookie.contains(addr), "the cookie names no address: {cookie}");
    }
    let c = pair(&cookie);
    for _ in 0..10 {
        let (origin, again) = get(&e, &[("cookie", &c)]).await;
        assert_eq!(origin, first, "pinned");
        assert!(again.is_none(), "a valid pin is not re-issued");
    }

    // Tampering with any part of the value: ignored, balanced normally, re-pinned.
    let value = c.split_once('=').unwrap().1;
    let parts: Vec<&str> = value.split('.').collect();
    let other_id = "0000000000000001";
    let forged = format!("rampart_affinity={}.{}.{}", parts[0], other_id, parts[2]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let (origin, again) = get(&e, &[("cookie", &forged)]).await;
        assert!(again.is_some(), "a forged pin gets a fresh cookie");
        seen.insert(origin);
    }
    assert!(seen.len() > 1, "forged cookies are balanced normally: {seen:?}");
}

#[tokio::test]
async fn sessions_move_off_disabled_backends_but_stay_on_draining_ones() {
    let o: Vec<Origin> = futures_util::future::join_all((0..2).map(|i| Origin::start(["a", "b"][i])))
        .await
        .into_iter()
        .map(|o| o.unwrap())
        .collect();
    let urls: Vec<String> = o.iter().map(|o| o.url()).collect();
    let e = TestEdge::start_with_token(&config(&urls, "affinity = { mode = \"cookie\" }", ""), "tok").await;
    let (first, cookie) = get(&e, &[]).await;
    let c = pair(&cookie.unwrap());
    let idx = if first == "a" { 0 } else { 1 };

    act(&e, idx, "drain").await;
    let (origin, again) = get(&e, &[("cookie", &c)]).await;
    assert_eq!(origin, first, "an existing session stays on a draining backend");
    assert!(again.is_none());
    let (fresh, _) = get(&e, &[]).await;
    assert_ne!(fresh, first, "a new session does not go to a draining backend");

    act(&e, idx, "disable").await;
    let (origin, again) = get(&e, &[("cookie", &c)]).await;
    assert_ne!(origin, first, "re-pinned away from a disabled backend");
    let c2 = pair(&again.expect("re-pinned with a new cookie"));
    assert_eq!(get(&e, &[("cookie", &c2)]).await.0, origin);
}

#[tokio::test]
async fn header_affinity_keeps_a_key_on_its_backend() {
    let o: Vec<Origin> = futures_util::future::join_all((0..3).map(|i| Origin::start(["a", "b", "c"][i])))
        .await
        .into_iter()
        .map(|o| o.unwrap())
        .collect();
    let urls: Vec<String> = o.iter().map(|o| o.url()).collect();
    let e = TestEdge::start_with_token(
        &config(&urls, "affinity = { mode = \"header\", header = \"x-session\" }", ""),
        "tok",
    )
    .await;
    let mut homes = Vec::new();
    for s in 0..20 {
        let k = format!("s{s}");
        let (home, cookie) = get(&e, &[("x-session", &k)]).await;
        assert!(cookie.is_none(), "header mode sets no cookie");
        for _ in 0..3 {
            assert_eq!(get(&e, &[("x-session", &k)]).await.0, home);
        }
        homes.push(home);
    }
    let distinct: std::collections::HashSet<_> = homes.iter().collect();
    assert!(distinct.len() > 1);
    // Disable one backend: only its sessions move.
    let victim = homes[0].clone();
    act(
        &e,
        ["a", "b", "c"].iter().position(|n| *n == victim).unwrap(),
        "disable",
    )
    .await;
    for (s, home) in homes.iter().enumerate() {
        let now = get(&e, &[("x-session", &format!("s{s}"))]).await.0;
        if *home == victim {
            assert_ne!(now, victim);
        } else {
            assert_eq!(&now, home);
        }
    }
}

#[tokio::test]
async fn a_pool_without_healthy_backends_hands_over_to_its_fallback() {
    let dead = closed_port().await.unwrap();
    let spare = Origin::start("spare").await.unwrap();
    let checks = r#"health = { kind = "tcp", interval = "50ms", jitter = "0", timeout = "200ms", consecutive_down = 1 }
fallback = "spare""#;
    let tail = format!("[[pool]]\nname = \"spare\"\nbackends = [\"{}\"]\n", spare.url());
    let e = TestEdge::start_with_token(&config(&[format!("http://{dead}")], checks, &tail), "tok").await;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = client().get(e.url("/")).send().await.unwrap();
        if r.status() == 200 {
            assert_eq!(r.headers()["x-origin-name"], "spare");
            assert_eq!(r.headers()["x-rampart-attempts"], "spare#0:SUCCESS");
            break;
        }
        assert!(tokio::time::Instant::now() < end, "never fell back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
