//! Provider chains: failover, explanation headers, fallback policy, scoped health, traces.

use crate::common::*;
use rampart_testkit::Origin;

struct Cdns {
    a: Origin,
    b: Origin,
    c: Origin,
    origin: Origin,
}

async fn cdns() -> Cdns {
    Cdns {
        a: Origin::start("cdn-a").await.unwrap(),
        b: Origin::start("cdn-b").await.unwrap(),
        c: Origin::start("cdn-c").await.unwrap(),
        origin: Origin::start("origin").await.unwrap(),
    }
}

fn config(o: &Cdns, chain_extra: &str, allowed: bool) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
[log]
access = "off"
[[chain]]
name = "video"
providers = [
  {{ name = "cdn-a", url = "{a}", timeout = "300ms" }},
  {{ name = "cdn-b", url = "{b}" }},
  {{ name = "cdn-c", url = "{c}" }},
]
fail_on_status = [403, 404, 408, 409, 423, 425, 429, 451, 500, 502, 503, 504]
origin_fallback = {{ url = "{origin}", allowed = {allowed} }}
{chain_extra}
[[site]]
default = true
explain = true
  [[site.route]]
  path = "/"
  chain = "video"
"#,
        a = o.a.url(),
        b = o.b.url(),
        c = o.c.url(),
        origin = o.origin.url(),
    )
}

fn unbase64url(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            _ => 63,
        }
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    out
}

#[tokio::test]
async fn timeout_then_block_then_success_explains_itself() {
    let o = cdns().await;
    o.a.set_hang("/videos/1.ts", true);
    o.b.set_status("/videos/1.ts", Some(429));
    let e = TestEdge::start(&config(&o, "", false)).await;
    let r = client().get(e.url("/videos/1.ts")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header_str(&r, "x-rampart-provider"), "cdn-c");
    assert_eq!(header_str(&r, "x-rampart-reason"), "PROVIDER_FAILOVER_SUCCESS");
    assert_eq!(
        header_str(&r, "x-rampart-attempts"),
        "cdn-a:PROVIDER_TIMEOUT,cdn-b:PROVIDER_BLOCKED_429,cdn-c:PROVIDER_SUCCESS"
    );
    assert_eq!(
        header_str(&r, "x-rampart-failure-points"),
        "1:PROVIDER_TIMEOUT:cdn-a:PROVIDER_TIMEOUT,2:PROVIDER_BLOCKED_STATUS:cdn-b:PROVIDER_BLOCKED_429"
    );
    let id = header_str(&r, "x-request-id");
    let trace: serde_json::Value =
        serde_json::from_slice(&unbase64url(&header_str(&r, "x-rampart-route-trace"))).unwrap();
    assert_eq!(trace["request_id"], id.as_str());
    assert_eq!(trace["route_key"], "/videos/");
    assert_eq!(trace["policy_id"], "video");
    assert_eq!(trace["selected_fallback"], "none");
    assert_eq!(trace["final_status"], 200);
    assert_eq!(trace["attempts"].as_array().unwrap().len(), 3);
    assert!(
        trace["attempts"][0]["duration_ms"].as_f64().unwrap() >= 300.0,
        "{trace}"
    );
    assert_eq!(trace["attempts"][1]["status"], 429);
    assert_eq!(trace["failure_points"][1]["kind"], "PROVIDER_BLOCKED_STATUS");
    assert_eq!(r.text().await.unwrap(), "hello from cdn-c\n");
}

#[tokio::test]
async fn each_reason_code() {
    let o = cdns().await;
    let e = TestEdge::start(&config(&o, "", false)).await;
    let get = |p: &'static str| {
        let url = e.url(p);
        async move { client().get(url).send().await.unwrap() }
    };
    let r = get("/primary").await;
    assert_eq!(header_str(&r, "x-rampart-reason"), "PRIMARY_PROVIDER_SUCCESS");
    assert_eq!(header_str(&r, "x-rampart-failure-points"), "none");

    o.a.set_hang("/t", true);
    let r = get("/t").await;
    assert_eq!(header_str(&r, "x-rampart-reason"), "PROVIDER_TIMEOUT_FAILOVER");
    assert_eq!(header_str(&r, "x-rampart-provider"), "cdn-b");

    o.a.set_status("/blocked", Some(403));
    let r = get("/blocked").await;
    assert_eq!(header_str(&r, "x-rampart-reason"), "PROVIDER_BLOCKED_FAILOVER");

    for cdn in [&o.a, &o.b, &o.c] {
        cdn.set_status("/gone", Some(404));
    }
    let r = get("/gone").await;
    assert_eq!(r.status(), 503, "fail closed");
    assert_eq!(
        header_str(&r, "x-rampart-reason"),
        "ALL_PROVIDERS_FAILED_FALLBACK_BLOCKED_BY_POLICY"
    );
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["policy"], "video");
    assert_eq!(j["reason"], "ALL_PROVIDERS_FAILED_FALLBACK_BLOCKED_BY_POLICY");
    assert_eq!(
        o.origin.requests(),
        0,
        "the origin is not fetched when the policy forbids it"
    );

    // The same failure with origin fallback allowed: a real fetch of the origin.
    let e2 = TestEdge::start(&config(&o, "", true)).await;
    let r = client().get(e2.url("/gone")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header_str(&r, "x-rampart-reason"),
        "ALL_PROVIDERS_FAILED_ORIGIN_FALLBACK_SELECTED"
    );
    assert_eq!(header_str(&r, "x-rampart-provider"), "origin");
    assert_eq!(r.text().await.unwrap(), "hello from origin\n");
    assert_eq!(o.origin.requests(), 1);
}

#[tokio::test]
async fn a_provider_failing_on_one_route_is_demoted_there_only() {
    let o = cdns().await;
    for p in ["/live/x/1.ts", "/live/x/2.ts", "/live/x/3.ts"] {
        o.a.set_status(p, Some(503));
    }
    let e = TestEdge::start(&config(&o, "cooldown_after = 2\ncooldown = \"60s\"", false)).await;
    let first = |p: &'static str| {
        let url = e.url(p);
        async move {
            let r = client().get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            header_str(&r, "x-rampart-attempts")
        }
    };
    assert!(first("/live/x/1.ts").await.starts_with("cdn-a:PROVIDER_BLOCKED_503"));
    assert!(first("/live/x/2.ts").await.starts_with("cdn-a:PROVIDER_BLOCKED_503"));
    // Two failures in the /live/x/ scope: cdn-a cools down there and is tried last.
    assert_eq!(first("/live/x/3.ts").await, "cdn-b:PROVIDER_SUCCESS");
    // A sibling route keeps its ranking: cdn-a first, and it serves.
    assert_eq!(first("/live/y/1.ts").await, "cdn-a:PROVIDER_SUCCESS");
    // The reason is visible in the trace's ranking and in /admin/chains.
    let t = e.admin_json("/admin/traces?route=/live/x/&limit=1", None).await;
    let rank = &t["traces"][0]["rank"];
    assert_eq!(rank[0]["provider"], "cdn-b");
    assert_eq!(rank[2]["provider"], "cdn-a");
    assert_eq!(rank[2]["state"], "cooldown:route:/live/x/");
    let h = e.admin_json("/admin/chains", None).await;
    let cooling = h["health"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["provider"] == "cdn-a" && s["cooldown_seconds_left"].as_u64().unwrap() > 0)
        .map(|s| s["scope"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(cooling, vec!["route".to_string()], "only the route scope cools down");
}

#[tokio::test]
async fn the_next_provider_gets_the_same_request_and_body() {
    let o = cdns().await;
    o.a.set_status("/upload/echo", Some(503));
    let e = TestEdge::start(&config(&o, "", false)).await;
    let r = client()
        .post(e.url("/upload/echo?x=1"))
        .header("x-custom", "kept")
        .body(vec![b'z'; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(header_str(&r, "x-rampart-provider"), "cdn-b");
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["path"], "/upload/echo");
    assert_eq!(j["query"], "x=1");
    assert_eq!(j["body_length"], 5000);
    assert_eq!(j["headers"]["x-custom"][0], "kept");
    assert_eq!(
        j["headers"]["host"][0],
        o.b.addr().to_string(),
        "each provider gets its own host"
    );
}

#[tokio::test]
async fn traces_are_kept_and_filtered() {
    let o = cdns().await;
    o.a.set_status("/f/1", Some(500));
    let e = TestEdge::start(&config(&o, "", false)).await;
    for p in ["/f/1", "/g/1", "/g/2"] {
        client().get(e.url(p)).send().await.unwrap();
    }
    let all = e.admin_json("/admin/traces", None).await;
    assert_eq!(all["traces"].as_array().unwrap().len(), 3);
    assert_eq!(all["traces"][0]["route_key"], "/g/", "newest first");
    let g = e.admin_json("/admin/traces?route=/g/", None).await;
    assert_eq!(g["traces"].as_array().unwrap().len(), 2);
    let b = e.admin_json("/admin/traces?provider=cdn-b", None).await;
    assert_eq!(b["traces"].as_array().unwrap().len(), 1, "only /f/1 reached cdn-b");
}

#[tokio::test]
async fn the_ranking_adapts_to_recent_failures_and_recovers_as_they_decay() {
    let o = cdns().await;
    o.a.set_status("/r/1", Some(503));
    o.a.set_status("/r/2", Some(503));
    let e = TestEdge::start(&config(&o, "penalty_half_life = \"150ms\"", false)).await;
    let first = |p: String| {
        let url = e.url(&p);
        async move { header_str(&client().get(url).send().await.unwrap(), "x-rampart-attempts") }
    };
    assert!(first("/r/1".into()).await.starts_with("cdn-a:PROVIDER_BLOCKED_503"));
    assert!(first("/r/2".into()).await.starts_with("cdn-a:PROVIDER_BLOCKED_503"));
    // Two recent failures on /r/: cdn-a now ranks behind cdn-b there, and the trace says why.
    assert_eq!(first("/r/3".into()).await, "cdn-b:PROVIDER_SUCCESS");
    let t = e.admin_json("/admin/traces?route=/r/&limit=1", None).await;
    let a_rank = &t["traces"][0]["rank"][2];
    assert_eq!(a_rank["provider"], "cdn-a");
    assert!(a_rank["state"].as_str().unwrap().starts_with("penalty:"), "{a_rank}");
    assert!(a_rank["ewma_ms"].as_f64().is_some());
    // As the penalty decays (half-life 150 ms), cdn-a returns to first place.
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut i = 4;
    loop {
        let got = first(format!("/r/{i}")).await;
        if got == "cdn-a:PROVIDER_SUCCESS" {
            break;
        }
        assert_eq!(got, "cdn-b:PROVIDER_SUCCESS");
        assert!(tokio::time::Instant::now() < end, "cdn-a never recovered its rank");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        i += 1;
    }
}

fn cached_config(o: &Cdns, route_cache: &str) -> String {
    config(o, "", true).replace(
        "  chain = \"video\"\n",
        &format!("  chain = \"video\"\n  cache = {{ {route_cache} }}\n"),
    )
}

async fn get_cached(e: &TestEdge, path: &str) -> (u16, String, String, String) {
    let r = client().get(e.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let cache = header_str(&r, "x-cache-status");
    let provider = header_str(&r, "x-rampart-provider");
    (status, cache, provider, r.text().await.unwrap())
}

#[tokio::test]
async fn chain_routes_are_cached_after_failover() {
    let o = cdns().await;
    o.a.set_hang("/cache/seg.ts", true);
    let e = TestEdge::start(&cached_config(&o, "")).await;
    let p = "/cache/seg.ts?cc=max-age%3D60";
    let (status, cache, provider, body) = get_cached(&e, p).await;
    assert_eq!((status, cache.as_str(), provider.as_str()), (200, "MISS", "cdn-b"));
    let (status, cache, _, again) = get_cached(&e, p).await;
    assert_eq!((status, cache.as_str()), (200, "HIT"));
    assert_eq!(again, body);
    assert_eq!(o.b.requests(), 1, "the hit did not go to any provider");
    assert_eq!(o.c.requests() + o.origin.requests(), 0);
}

#[tokio::test]
async fn a_stale_copy_stands_in_when_every_provider_fails() {
    let o = cdns().await;
    let e = TestEdge::start(&cached_config(&o, "stale_if_error = \"60s\"")).await;
    // Stored, and stale at once.
    let p = "/cache/live.m3u8?cc=max-age%3D0";
    let (_, cache, provider, body) = get_cached(&e, p).await;
    assert_eq!((cache.as_str(), provider.as_str()), ("MISS", "cdn-a"));
    for cdn in [&o.a, &o.b, &o.c, &o.origin] {
        cdn.set_status("/cache/live.m3u8", Some(503));
    }
    let r = client().get(e.url(p)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header_str(&r, "x-cache-status"), "STALE");
    assert!(
        !header_str(&r, "x-rampart-failure-points").is_empty(),
        "the failed chain is explained"
    );
    assert_eq!(r.text().await.unwrap(), body);
}

#[tokio::test]
async fn a_chain_route_revalidates_through_the_chain() {
    let o = cdns().await;
    let e = TestEdge::start(&cached_config(&o, "stale_while_revalidate = \"60s\"")).await;
    let p = "/cache/v.ts?cc=max-age%3D0&etag=v1";
    assert_eq!(get_cached(&e, p).await.1, "MISS");
    // cdn-a now times out: the background refresh fails over to cdn-b.
    o.a.set_hang("/cache/v.ts", true);
    assert_eq!(get_cached(&e, p).await.1, "UPDATING");
    assert!(
        eventually(|| o.b.requests() == 1, std::time::Duration::from_secs(10)).await,
        "the refresh went through the chain to cdn-b"
    );
}
