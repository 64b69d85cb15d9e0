//! Load balancing and backend administration over real sockets.

use crate::common::*;
use rampart_testkit::Origin;
use std::time::Duration;

fn two_backends(a: &Origin, b: &Origin, pool_extra: &str) -> String {
    one_pool(
        &[&a.url(), &b.url()],
        Parts {
            admin: Some("token = \"file:token\""),
            pool: pool_extra,
            site: "explain = true",
            ..Parts::default()
        },
    )
}

async fn pools(e: &TestEdge) -> serde_json::Value {
    e.admin_json("/admin/pools", Some("tok")).await
}

async fn act(e: &TestEdge, backend: &str, action: &str) -> (u16, serde_json::Value) {
    e.admin_post(&format!("/admin/pools/app/backends/{backend}/{action}"), "tok", "")
        .await
}

async fn origin_of(e: &TestEdge, path: &str, header: Option<(&str, &str)>) -> String {
    let mut r = client().get(e.url(path));
    if let Some((k, v)) = header {
        r = r.header(k, v);
    }
    let r = r.send().await.unwrap();
    r.headers()
        .get("x-origin-name")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn least_request_spreads_requests_in_flight() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let e = TestEdge::start_with_token(&two_backends(&a, &b, "balance = \"least_request\""), "tok").await;
    let mut hung = Vec::new();
    for _ in 0..6 {
        let url = e.url("/hang");
        hung.push(tokio::spawn(async move { client().get(url).send().await }));
    }
    assert!(eventually(|| a.requests() + b.requests() == 6, Duration::from_secs(5)).await);
    let p = pools(&e).await;
    let in_flight: Vec<u64> = p["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["in_flight"].as_u64().unwrap())
        .collect();
    assert_eq!(
        in_flight,
        vec![3, 3],
        "power of two choices over two backends balances exactly"
    );
    assert_eq!(p["pools"][0]["balance"], "least_request");
    for h in hung {
        h.abort();
    }
    // In-flight counts return to zero when the requests end.
    let zero = eventually_async(|| async { pools(&e).await["pools"][0]["backends"][0]["in_flight"] == 0 }).await;
    assert!(zero);
}

async fn eventually_async<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn consistent_hash_pins_a_key_to_a_backend() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let e = TestEdge::start_with_token(
        &two_backends(&a, &b, "balance = \"consistent_hash\"\nhash_key = \"header:x-user\""),
        "tok",
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    for user in 0..40 {
        let u = format!("user-{user}");
        let first = origin_of(&e, "/", Some(("x-user", &u))).await;
        for _ in 0..3 {
            assert_eq!(origin_of(&e, "/", Some(("x-user", &u))).await, first, "{u} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "keys spread over both backends");
    // Disabling a backend moves only its keys.
    let before: Vec<String> = futures_util::future::join_all((0..40).map(|u| {
        let e = &e;
        async move { origin_of(e, "/", Some(("x-user", &format!("user-{u}")))).await }
    }))
    .await;
    assert_eq!(act(&e, "1", "disable").await.0, 200);
    for (u, was) in before.iter().enumerate() {
        let now = origin_of(&e, "/", Some(("x-user", &format!("user-{u}")))).await;
        assert_eq!(now, "a");
        if was == "a" {
            assert_eq!(&now, was);
        }
    }
}

#[tokio::test]
async fn drain_disable_enable_without_reload() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let e = TestEdge::start_with_token(&two_backends(&a, &b, ""), "tok").await;

    // A slow response in flight on backend 0 when it is drained still completes.
    let slow = tokio::spawn({
        let url = e.url("/slow?chunks=4&interval=100ms");
        async move {
            let r = client().get(url).send().await.unwrap();
            (
                r.headers()["x-origin-name"].to_str().unwrap().to_string(),
                r.text().await.unwrap(),
            )
        }
    });
    assert!(eventually(|| a.requests() == 1, Duration::from_secs(5)).await);
    let (status, body) = act(&e, &a.addr().to_string(), "drain").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "draining");
    assert_eq!(body["in_flight"], 1);
    for _ in 0..6 {
        assert_eq!(
            origin_of(&e, "/", None).await,
            "b",
            "a draining backend takes no new requests"
        );
    }
    let (name, text) = slow.await.unwrap();
    assert_eq!((name.as_str(), text.lines().count()), ("a", 4));

    let p = pools(&e).await;
    assert_eq!(p["pools"][0]["backends"][0]["state"], "draining");
    assert_eq!(p["pools"][0]["backends"][0]["in_flight"], 0);

    // Disable the other one too: nothing is available.
    // A URL names the backend too, percent-encoded as one path segment.
    let encoded = b.url().replace(':', "%3A").replace('/', "%2F");
    assert_eq!(act(&e, &encoded, "disable").await.0, 200);
    let r = client().get(e.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-rampart-reason"], "NO_AVAILABLE_BACKEND");

    // The state survives a reload of an unchanged pool and of a changed one.
    std::fs::write(e.dir.join("rampart.toml"), two_backends(&a, &b, "balance = \"random\"")).unwrap();
    assert_eq!(e.admin_post("/admin/reload", "tok", "").await.0, 200);
    assert_eq!(client().get(e.url("/")).send().await.unwrap().status(), 503);

    assert_eq!(act(&e, "0", "enable").await.0, 200);
    assert_eq!(origin_of(&e, "/", None).await, "a");
}

#[tokio::test]
async fn backend_actions_are_checked_and_authenticated() {
    let a = Origin::start("a").await.unwrap();
    let b = Origin::start("b").await.unwrap();
    let e = TestEdge::start_with_token(&two_backends(&a, &b, ""), "tok").await;
    assert_eq!(act(&e, "7", "drain").await.0, 404);
    assert_eq!(act(&e, "0", "explode").await.0, 404);
    assert_eq!(
        e.admin_post("/admin/pools/nope/backends/0/drain", "tok", "").await.0,
        404
    );
    let r = client()
        .post(e.admin("/admin/pools/app/backends/0/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client().get(e.admin("/admin/pools")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}
