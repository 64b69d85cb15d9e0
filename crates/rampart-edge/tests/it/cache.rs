//! The HTTP cache over real sockets (RFC 9111 shared cache, memory tier).

use crate::common::*;
use rampart_testkit::Origin;

fn config(origin: &Origin, route_cache: &str) -> String {
    one_pool(
        &[&origin.url()],
        Parts {
            top: "[cache]\nmemory_size = \"16MiB\"\nmax_object_size = \"64KiB\"",
            route: &format!("cache = {{ {route_cache} }}"),
            ..Parts::default()
        },
    )
}

struct Got {
    status: u16,
    cache: String,
    body: String,
    age: Option<u64>,
    headers: reqwest::header::HeaderMap,
}

async fn get(e: &TestEdge, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut r = client().get(e.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let cache = h
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let age = h.get("age").map(|v| v.to_str().unwrap().parse().unwrap());
    let body = r.text().await.unwrap();
    Got {
        status,
        cache,
        body,
        age,
        headers: h,
    }
}

#[tokio::test]
async fn a_fresh_response_is_served_from_cache_with_age() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let p = "/cache/a?cc=max-age%3D60";
    let first = get(&e, p, &[]).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "MISS"));
    assert_eq!(first.headers["cache-status"], "rampart; fwd=uri-miss; stored");
    let second = get(&e, p, &[]).await;
    assert_eq!(second.cache, "HIT");
    assert_eq!(second.body, first.body, "the same stored body");
    assert_eq!(o.requests(), 1, "the origin was asked once");
    assert!(second.age.is_some_and(|a| a < 5));
    assert!(
        second.headers["cache-status"]
            .to_str()
            .unwrap()
            .starts_with("rampart; hit; ttl=")
    );
    // HEAD is answered from the stored GET, without a body.
    let head = client().head(e.url(p)).send().await.unwrap();
    assert_eq!(head.headers()["x-cache-status"], "HIT");
    assert_eq!(o.requests(), 1);
}

#[tokio::test]
async fn private_no_store_and_cookies_are_never_shared() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    for p in [
        "/cache/p?cc=private%2C%20max-age%3D60",
        "/cache/n?cc=no-store",
        "/cache/c?cc=max-age%3D60&cookie=1",
    ] {
        let a = get(&e, p, &[]).await;
        let b = get(&e, p, &[]).await;
        assert_eq!(b.cache, "MISS", "{p} was served from cache");
        assert_ne!(a.body, b.body, "{p}");
    }
    assert_eq!(o.requests(), 6);
    // With allow_set_cookie the response is stored, but its cookie never replayed.
    let e2 = TestEdge::start(&config(&o, "allow_set_cookie = true")).await;
    let p = "/cache/c2?cc=max-age%3D60&cookie=1";
    let first = get(&e2, p, &[]).await;
    assert!(
        first.headers.contains_key("set-cookie"),
        "the client that caused it gets its cookie"
    );
    let second = get(&e2, p, &[]).await;
    assert_eq!(second.cache, "HIT");
    assert!(
        !second.headers.contains_key("set-cookie"),
        "never replayed to another client"
    );
}

#[tokio::test]
async fn authorization_is_answered_from_cache_only_when_the_response_allows_it() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let auth = [("authorization", "Bearer abc")];
    let p = "/cache/auth?cc=max-age%3D60";
    assert_eq!(get(&e, p, &auth).await.cache, "MISS");
    assert_eq!(
        get(&e, p, &auth).await.cache,
        "MISS",
        "not stored: no public/s-maxage/must-revalidate"
    );
    let p = "/cache/auth-public?cc=public%2C%20max-age%3D60";
    get(&e, p, &auth).await;
    assert_eq!(get(&e, p, &auth).await.cache, "HIT");
}

#[tokio::test]
async fn vary_keeps_variants_apart() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let p = "/cache/v?cc=max-age%3D60&vary=accept-encoding";
    let gz = get(&e, p, &[("accept-encoding", "gzip")]).await;
    let br = get(&e, p, &[("accept-encoding", "br")]).await;
    assert_eq!((gz.cache.as_str(), br.cache.as_str()), ("MISS", "MISS"));
    let gz2 = get(&e, p, &[("accept-encoding", "GZIP")]).await;
    assert_eq!(gz2.cache, "HIT");
    assert!(gz2.body.ends_with("ae=gzip"), "{}", gz2.body);
    let br2 = get(&e, p, &[("accept-encoding", "br")]).await;
    assert!(br2.body.ends_with("ae=br"));
    // Vary: * is never served from cache.
    let star = "/cache/star?cc=max-age%3D60&vary=*";
    get(&e, star, &[]).await;
    assert_eq!(get(&e, star, &[]).await.cache, "MISS");
}

#[tokio::test]
async fn stale_entries_revalidate_and_304_refreshes_them() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    // max-age=0: stored, immediately stale, validated with its ETag.
    let p = "/cache/r?cc=max-age%3D0&etag=v1";
    let first = get(&e, p, &[]).await;
    assert_eq!(first.cache, "MISS");
    let second = get(&e, p, &[]).await;
    assert_eq!(second.cache, "REVALIDATED");
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body, "the stored body, after a 304 from the origin");
    assert_eq!(o.requests(), 2);
    // no-cache: stored but validated on every use.
    let p = "/cache/nc?cc=no-cache&etag=v2";
    get(&e, p, &[]).await;
    assert_eq!(get(&e, p, &[]).await.cache, "REVALIDATED");
    // Without a validator, a stale entry is fetched again in full.
    let p = "/cache/x?cc=max-age%3D0";
    get(&e, p, &[]).await;
    assert_eq!(get(&e, p, &[]).await.cache, "EXPIRED");
}

#[tokio::test]
async fn client_conditionals_are_answered_from_cache() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let p = "/cache/cond?cc=max-age%3D60&etag=v7";
    get(&e, p, &[]).await;
    let r = get(&e, p, &[("if-none-match", "\"v7\"")]).await;
    assert_eq!((r.status, r.cache.as_str()), (304, "HIT"));
    assert_eq!(r.body, "");
    let r = get(&e, p, &[("if-none-match", "\"other\"")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(o.requests(), 1);
}

#[tokio::test]
async fn request_directives_are_honoured() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let p = "/cache/rd?cc=max-age%3D60";
    get(&e, p, &[]).await;
    assert_eq!(
        get(&e, p, &[("cache-control", "no-cache")]).await.cache,
        "EXPIRED",
        "no-cache goes to the origin"
    );
    assert_eq!(get(&e, p, &[("cache-control", "min-fresh=120")]).await.cache, "EXPIRED");
    let r = get(
        &e,
        "/cache/never-seen?cc=max-age%3D60",
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(r.status, 504);
    assert_eq!(r.headers["x-rampart-reason"], "ONLY_IF_CACHED_MISS");
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_target() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let p = "/cache/inv?cc=max-age%3D60";
    get(&e, p, &[]).await;
    assert_eq!(get(&e, p, &[]).await.cache, "HIT");
    let r = client().post(e.url(p)).body("x").send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "BYPASS");
    assert_eq!(get(&e, p, &[]).await.cache, "MISS", "invalidated by the POST");
}

#[tokio::test]
async fn objects_over_the_size_limit_are_not_stored() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let small = "/cache/small?cc=max-age%3D60";
    get(&e, small, &[]).await;
    assert_eq!(get(&e, small, &[]).await.cache, "HIT", "small objects are stored");
    // A 200 is cacheable by default, but this one is larger than max_object_size (64 KiB).
    let r = get(&e, "/large?size=200000", &[]).await;
    assert_eq!(r.body.len(), 200_000, "streamed through whole");
    assert_eq!(r.headers["cache-status"], "rampart; fwd=uri-miss; detail=too-large");
    assert_eq!(get(&e, "/large?size=200000", &[]).await.cache, "MISS", "not stored");
}

fn admin_config(origin: &Origin, route_cache: &str) -> String {
    config(origin, route_cache) + "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"file:token\"\n"
}

async fn purge(e: &TestEdge, body: &str) -> (u16, serde_json::Value) {
    e.admin_post("/admin/cache/purge", "tok", body).await
}

#[tokio::test]
async fn purge_by_url_prefix_tag_and_all() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start_with_token(&admin_config(&o, ""), "tok").await;
    let host = e.http.to_string();
    let paths = [
        "/cache/a/1?cc=max-age%3D60&tag=red",
        "/cache/a/2?cc=max-age%3D60&tag=red%2Cblue",
        "/cache/b/1?cc=max-age%3D60&tag=blue",
    ];
    let warm = |e: &TestEdge| {
        let urls: Vec<String> = paths.iter().map(|p| e.url(p)).collect();
        async move {
            for u in urls {
                client().get(u).send().await.unwrap().bytes().await.unwrap();
            }
        }
    };
    warm(&e).await;
    for p in paths {
        assert_eq!(get(&e, p, &[]).await.cache, "HIT");
    }
    let url = format!("http://{host}/cache/a/1?cc=max-age%3D60&tag=red");
    assert_eq!(
        purge(&e, &serde_json::json!({ "url": url }).to_string()).await.1["purged"],
        1
    );
    assert_eq!(get(&e, paths[0], &[]).await.cache, "MISS");
    assert_eq!(get(&e, paths[1], &[]).await.cache, "HIT");

    let (_, r) = purge(&e, &serde_json::json!({ "tag": "blue" }).to_string()).await;
    assert_eq!(r["purged"], 2);
    assert_eq!(get(&e, paths[1], &[]).await.cache, "MISS");
    assert_eq!(get(&e, paths[2], &[]).await.cache, "MISS");

    warm(&e).await;
    let (_, r) = purge(
        &e,
        &serde_json::json!({ "prefix": format!("http://{host}/cache/a/") }).to_string(),
    )
    .await;
    assert_eq!(r["purged"], 2);
    assert_eq!(get(&e, paths[2], &[]).await.cache, "HIT", "outside the prefix");
    let (_, r) = purge(&e, r#"{"all": true}"#).await;
    assert!(r["purged"].as_u64().unwrap() >= 1);
    assert_eq!(get(&e, paths[2], &[]).await.cache, "MISS");

    assert_eq!(purge(&e, r#"{"url": "x", "tag": "y"}"#).await.0, 400);
    assert_eq!(purge(&e, r#"{"colour": "red"}"#).await.0, 400);
    let audit = e.admin_json("/admin/audit", Some("tok")).await;
    assert_eq!(audit["audit"][0]["action"], "cache-purge");
}

#[tokio::test]
async fn soft_purge_revalidates_and_hard_purge_deletes() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start_with_token(&admin_config(&o, ""), "tok").await;
    let p = "/cache/soft?cc=max-age%3D60&etag=s1";
    let first = get(&e, p, &[]).await;
    let url = format!("http://{}{p}", e.http);
    let (_, r) = purge(&e, &serde_json::json!({ "url": url, "soft": true }).to_string()).await;
    assert_eq!((r["purged"].as_u64(), r["soft"].as_bool()), (Some(1), Some(true)));
    let second = get(&e, p, &[]).await;
    assert_eq!(second.cache, "REVALIDATED", "soft purge: validated with the origin");
    assert_eq!(second.body, first.body);
    purge(&e, &serde_json::json!({ "url": url }).to_string()).await;
    assert_eq!(get(&e, p, &[]).await.cache, "MISS", "hard purge: gone");
}

#[tokio::test]
async fn stats_and_metrics() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start_with_token(&admin_config(&o, ""), "tok").await;
    let p = "/cache/st?cc=max-age%3D60";
    get(&e, p, &[]).await;
    get(&e, p, &[]).await;
    get(&e, p, &[]).await;
    let s = e.admin_json("/admin/cache/stats", Some("tok")).await;
    assert_eq!(
        (s["hits"].as_u64(), s["misses"].as_u64(), s["stored"].as_u64()),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(s["memory"]["objects"], 1);
    assert!(s["memory"]["bytes"].as_u64().unwrap() > 0);
    let m = e.metrics().await;
    assert!(m.contains("rampart_cache_hits_total 2"), "{m}");
    assert!(m.contains("rampart_cache_objects 1"), "{m}");
}

#[tokio::test]
async fn stale_if_error_serves_a_stale_response_when_the_origin_fails() {
    let o = Origin::start("o").await.unwrap();
    // No idle upstream connections: once the origin is gone, connecting fails.
    let cfg = config(&o, "stale_if_error = \"60s\"").replace("\n[[site]]", "\nmax_idle_per_backend = 0\n[[site]]");
    let e = TestEdge::start(&cfg).await;
    // Stored, immediately stale (max-age=0), no validator.
    let p = "/cache/sie?cc=max-age%3D0";
    let first = get(&e, p, &[]).await;
    // The origin answers 503 for it now: the stale copy stands in.
    o.set_status("/cache/sie", Some(503));
    let r = get(&e, p, &[]).await;
    assert_eq!((r.status, r.cache.as_str()), (200, "STALE"));
    assert_eq!(r.body, first.body);
    assert!(
        r.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("detail=stale-if-error")
    );
    // The origin goes away entirely: still served stale.
    let p2 = "/cache/sie2?cc=max-age%3D0";
    get(&e, p2, &[]).await;
    drop(o);
    let r = get(&e, p2, &[]).await;
    assert_eq!((r.status, r.cache.as_str()), (200, "STALE"));
    // Without a window the error reaches the client.
    let o2 = Origin::start("o2").await.unwrap();
    let e2 = TestEdge::start(&config(&o2, "")).await;
    get(&e2, p, &[]).await;
    o2.set_status("/cache/sie", Some(503));
    assert_eq!(get(&e2, p, &[]).await.status, 503);
}

#[tokio::test]
async fn concurrent_misses_make_one_origin_request() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let p = "/cache/co?cc=max-age%3D60&delay=300ms";
    let got = futures_util::future::join_all((0..10).map(|_| get(&e, p, &[]))).await;
    assert_eq!(o.requests(), 1, "coalesced into one origin request");
    let misses = got.iter().filter(|g| g.cache == "MISS").count();
    let hits = got.iter().filter(|g| g.cache == "HIT").count();
    assert_eq!((misses, hits), (1, 9));
    assert!(got.iter().all(|g| g.status == 200 && g.body == got[0].body));

    // When the leader's response cannot be stored, the others go to the origin themselves.
    let p = "/cache/co-nostore?cc=no-store&delay=200ms";
    let got = futures_util::future::join_all((0..5).map(|_| get(&e, p, &[]))).await;
    assert!(got.iter().all(|g| g.status == 200 && g.cache == "MISS"));
    assert_eq!(o.requests(), 1 + 5);
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let p = "/cache/swr?cc=max-age%3D1%2C%20stale-while-revalidate%3D60";
    let first = get(&e, p, &[]).await;
    assert_eq!(first.cache, "MISS");
    // Once stale (after its 1 s), the stored copy is served at once and refreshed in
    // the background: UPDATING with the old body, then HIT with the new one.
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let updating = loop {
        let g = get(&e, p, &[]).await;
        if g.cache == "UPDATING" {
            break g;
        }
        assert_eq!(g.cache, "HIT");
        assert!(tokio::time::Instant::now() < end, "never became stale");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(updating.body, first.body, "the stale copy, served at once");
    assert!(
        updating.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("stale-while-revalidate")
    );
    let refreshed = loop {
        let g = get(&e, p, &[]).await;
        if g.cache == "HIT" && g.body != first.body {
            break g;
        }
        assert!(tokio::time::Instant::now() < end, "never refreshed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(refreshed.status, 200);
    assert_eq!(o.requests(), 2, "one background refresh");
}

#[tokio::test]
async fn ranges_are_answered_from_a_cached_object() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let p = "/cache/video-1.ts?cc=max-age%3D60&etag=seg1";
    let full = get(&e, p, &[]).await;
    let len = full.body.len();
    let r = get(&e, p, &[("range", "bytes=2-4")]).await;
    assert_eq!((r.status, r.cache.as_str()), (206, "HIT"));
    assert_eq!(r.body, full.body[2..=4]);
    assert_eq!(r.headers["content-range"], format!("bytes 2-4/{len}").as_str());
    let r = get(&e, p, &[("range", "bytes=-3")]).await;
    assert_eq!(r.body, full.body[len - 3..]);
    let r = get(&e, p, &[("range", format!("bytes={len}-").as_str())]).await;
    assert_eq!(r.status, 416);
    assert_eq!(r.headers["content-range"], format!("bytes */{len}").as_str());
    // If-Range with another validator: the whole object.
    let r = get(&e, p, &[("range", "bytes=0-1"), ("if-range", "\"other\"")]).await;
    assert_eq!((r.status, r.body.len()), (200, len));
    let r = get(&e, p, &[("range", "bytes=0-1"), ("if-range", "\"seg1\"")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(o.requests(), 1, "every range came from the one cached object");
}

#[tokio::test]
async fn route_policy_shapes_the_key_ttl_and_bypass() {
    let o = Origin::start("o").await.unwrap();
    let policy = r#"sort_query = true, ignore_query = ["utm_source"], key_headers = ["x-device"], key_cookies = ["lang"], min_ttl = "60s", bypass_cookies = ["session"], bypass_headers = ["x-no-cache"]"#;
    let e = TestEdge::start(&config(&o, policy)).await;
    // max-age=0 from the origin, raised to 60s by min_ttl.
    let p = "/cache/k?cc=max-age%3D0&b=2&a=1";
    assert_eq!(get(&e, p, &[]).await.cache, "MISS");
    assert_eq!(get(&e, p, &[]).await.cache, "HIT", "min_ttl keeps it fresh");
    // Same parameters in another order, plus an ignored one: the same entry.
    assert_eq!(
        get(&e, "/cache/k?a=1&cc=max-age%3D0&utm_source=x&b=2", &[]).await.cache,
        "HIT"
    );
    // A key header and a key cookie make separate entries.
    assert_eq!(get(&e, p, &[("x-device", "mobile")]).await.cache, "MISS");
    assert_eq!(get(&e, p, &[("x-device", "mobile")]).await.cache, "HIT");
    assert_eq!(get(&e, p, &[("cookie", "lang=fr")]).await.cache, "MISS");
    assert_eq!(get(&e, p, &[("cookie", "lang=fr")]).await.cache, "HIT");
    // Bypass conditions: straight to the origin, nothing stored.
    let before = o.requests();
    assert_eq!(get(&e, p, &[("cookie", "session=abc")]).await.cache, "BYPASS");
    assert_eq!(get(&e, p, &[("x-no-cache", "1")]).await.cache, "BYPASS");
    assert_eq!(o.requests(), before + 2);

    // ttl overrides the origin, max_ttl bounds it.
    let o2 = Origin::start("o2").await.unwrap();
    let e2 = TestEdge::start(&config(&o2, r#"ttl = "60s""#)).await;
    get(&e2, "/cache/t?cc=max-age%3D0", &[]).await;
    assert_eq!(get(&e2, "/cache/t?cc=max-age%3D0", &[]).await.cache, "HIT");
    let e3 = TestEdge::start(&config(&o2, r#"max_ttl = "0""#)).await;
    get(&e3, "/cache/u?cc=max-age%3D3600", &[]).await;
    assert_eq!(get(&e3, "/cache/u?cc=max-age%3D3600", &[]).await.cache, "EXPIRED");
}

#[tokio::test]
async fn purge_method_from_allowed_networks() {
    let o = Origin::start("o").await.unwrap();
    let purge = reqwest::Method::from_bytes(b"PURGE").unwrap();
    let p = "/cache/pm?cc=max-age%3D60";
    let allowed = config(&o, "").replace("[cache]\n", "[cache]\npurge_allow = [\"127.0.0.0/8\"]\n");
    let e = TestEdge::start(&allowed).await;
    get(&e, p, &[]).await;
    assert_eq!(get(&e, p, &[]).await.cache, "HIT");
    let r = client().request(purge.clone(), e.url(p)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "{\"purged\":1,\"soft\":false}\n");
    assert_eq!(get(&e, p, &[]).await.cache, "MISS");

    let other = config(&o, "").replace("[cache]\n", "[cache]\npurge_allow = [\"10.0.0.0/8\"]\n");
    let e2 = TestEdge::start(&other).await;
    let r = client().request(purge.clone(), e2.url(p)).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-rampart-reason"], "PURGE_NOT_ALLOWED");

    // Off by default: PURGE is just another method, proxied and not cached.
    let e3 = TestEdge::start(&config(&o, "")).await;
    let before = o.requests();
    let r = client().request(purge, e3.url(p)).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "BYPASS");
    assert_eq!(o.requests(), before + 1);
}

fn disk_config(o: &Origin, dir: &std::path::Path) -> String {
    config(o, "").replace(
        "[cache]\n",
        &format!("[cache]\ndisk_dir = \"{}\"\ndisk_size = \"8MiB\"\n", dir.display()),
    )
}

/// Wait until the disk writer has written `n` object files.
async fn files_on_disk(dir: &std::path::Path, n: usize) -> Vec<std::path::PathBuf> {
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let files: Vec<_> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|f| f.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "obj"))
                    .collect()
            })
            .unwrap_or_default();
        if files.len() >= n {
            return files;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the disk writer never wrote {n} file(s)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_disk_tier_survives_a_restart() {
    let o = Origin::start("o").await.unwrap();
    let dir = temp_dir().join("disk");
    let cfg = disk_config(&o, &dir);
    let mut e = TestEdge::start(&cfg).await;
    let p = "/cache/d?cc=max-age%3D600";
    let first = get(&e, p, &[]).await;
    files_on_disk(&dir, 1).await;
    e.edge.take().unwrap().shutdown(std::time::Duration::from_secs(2)).await;

    let e2 = TestEdge::start(&cfg).await;
    let again = get(&e2, p, &[]).await;
    assert_eq!(again.cache, "HIT", "served from the disk tier after a restart");
    assert_eq!(again.body, first.body);
    assert!(again.age.is_some());
    assert_eq!(o.requests(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_corrupt_disk_entry_is_dropped_and_refetched_never_served() {
    let o = Origin::start("o").await.unwrap();
    let dir = temp_dir().join("disk");
    let cfg = disk_config(&o, &dir);
    let mut e = TestEdge::start(&cfg).await;
    let p = "/cache/corrupt?cc=max-age%3D600";
    let first = get(&e, p, &[]).await;
    let files = files_on_disk(&dir, 1).await;
    e.edge.take().unwrap().shutdown(std::time::Duration::from_secs(2)).await;
    // Flip a byte in the body.
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let i = bytes.len() - 40;
    bytes[i] ^= 0x55;
    std::fs::write(&files[0], &bytes).unwrap();

    let e2 = TestEdge::start(&cfg).await;
    let r = get(&e2, p, &[]).await;
    assert_eq!(r.cache, "MISS", "the corrupt copy is not served");
    assert_ne!(r.body, first.body, "fetched again from the origin");
    assert_eq!(o.requests(), 2);
    // Truncated files are caught the same way.
    let files = files_on_disk(&dir, 1).await;
    let mut e2 = e2;
    e2.edge
        .take()
        .unwrap()
        .shutdown(std::time::Duration::from_secs(2))
        .await;
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::write(&files[0], &bytes[..bytes.len() / 2]).unwrap();
    let e3 = TestEdge::start(&cfg).await;
    assert_eq!(get(&e3, p, &[]).await.cache, "MISS");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn coalesced_requests_with_authorization_follow_the_same_rules() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    // The leader is anonymous; its response (no public/s-maxage/must-revalidate) is stored.
    // A request with Authorization waiting on it must not be answered from it.
    let p = "/cache/co-auth?cc=max-age%3D60&delay=300ms";
    let leader = get(&e, p, &[]);
    let follower = async {
        // Start once the leader is at the origin (its response takes 300 ms).
        assert!(eventually(|| o.requests() == 1, std::time::Duration::from_secs(5)).await);
        get(&e, p, &[("authorization", "Bearer x")]).await
    };
    let (l, f) = tokio::join!(leader, follower);
    assert_eq!(l.cache, "MISS");
    assert_eq!(f.cache, "MISS", "not answered from an entry that does not allow it");
    assert_eq!(o.requests(), 2);
}

#[tokio::test]
async fn a_soft_purge_marks_the_disk_copy_stale_across_a_restart() {
    let o = Origin::start("o").await.unwrap();
    let dir = temp_dir().join("disk");
    let cfg = disk_config(&o, &dir) + "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"file:token\"\n";
    let mut e = TestEdge::start_with_token(&cfg, "tok").await;
    let p = "/cache/soft-disk?cc=max-age%3D600&etag=d1";
    assert_eq!(get(&e, p, &[]).await.cache, "MISS");
    let files = files_on_disk(&dir, 1).await;
    let url = format!("http://{}{p}", e.edge.as_ref().unwrap().http_addrs()[0]);
    let (_, r) = purge(&e, &serde_json::json!({ "url": url, "soft": true }).to_string()).await;
    assert_eq!(r["purged"], 1);
    // The writer rewrites the file with the mark; wait for it, then restart.
    let marked = eventually(
        || {
            let mark = b"\"purged\":true";
            std::fs::read(&files[0]).is_ok_and(|b| b.windows(mark.len()).any(|w| w == mark))
        },
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(marked, "the soft-purge mark reached the file");
    e.edge.take().unwrap().shutdown(std::time::Duration::from_secs(2)).await;

    let e2 = TestEdge::start_with_token(&cfg, "tok").await;
    let r = get(&e2, p, &[]).await;
    assert_eq!(
        r.cache, "REVALIDATED",
        "the disk copy was validated, not served as fresh"
    );
    assert_eq!(o.requests(), 2);
    assert_eq!(get(&e2, p, &[]).await.cache, "HIT", "validated: fresh again");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_disk_tier_evicts_least_recently_used_files_and_counts_them() {
    let o = Origin::start("o").await.unwrap();
    let dir = temp_dir().join("disk");
    // 1 MiB of disk, objects of about 60 KiB: the 18th write must evict.
    let cfg = disk_config(&o, &dir).replace("disk_size = \"8MiB\"", "disk_size = \"1MiB\"")
        + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let e = TestEdge::start(&cfg).await;
    for i in 0..20 {
        get(&e, &format!("/cache/ev{i}?cc=max-age%3D600&pad=60000"), &[]).await;
        // One at a time, so no write is dropped from a full queue.
        files_on_disk(&dir, (i + 1).min(15)).await;
    }
    let evicted = disk_evictions(&e).await;
    assert!(evicted >= 3, "disk evictions counted: {evicted}");
    let stats = e.admin_json("/admin/cache/stats", None).await;
    assert!(stats["disk"]["bytes"].as_u64().unwrap() <= 1 << 20);
    let metrics = e.metrics().await;
    assert!(metrics.contains("rampart_cache_disk_evictions_total"), "{metrics}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The disk eviction count once the writer has caught up with 20 writes.
async fn disk_evictions(e: &TestEdge) -> u64 {
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = e.admin_json("/admin/cache/stats", None).await;
        let n = s["disk"]["evicted"].as_u64().unwrap_or(0);
        if n >= 3 || tokio::time::Instant::now() > end {
            return n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_range_miss_fetches_the_whole_object_stores_it_and_answers_the_range() {
    let o = Origin::start("o").await.unwrap();
    let e = TestEdge::start(&config(&o, "")).await;
    let p = "/cache/seg-2.ts?cc=max-age%3D60&etag=seg2&pad=1000";
    // The origin would answer this range with a 206 (not storable); the edge asks it
    // for the whole object instead, stores it and cuts the range itself.
    let r = get(&e, p, &[("range", "bytes=10-19")]).await;
    assert_eq!((r.status, r.cache.as_str()), (206, "MISS"));
    assert_eq!(r.body, "..........", "bytes 10-19 of `n=1 ae=-` and the dots");
    let total = "n=1 ae=-".len() + 1000;
    assert_eq!(r.headers["content-range"], format!("bytes 10-19/{total}").as_str());
    assert_eq!(r.headers["content-length"], "10");
    assert_eq!(r.headers["cache-status"], "rampart; fwd=uri-miss; stored");
    // The whole object is stored: the full GET and another range are hits.
    let full = get(&e, p, &[]).await;
    assert_eq!((full.status, full.cache.as_str(), full.body.len()), (200, "HIT", total));
    assert!(full.body.starts_with("n=1 "));
    let r = get(&e, p, &[("range", "bytes=0-2")]).await;
    assert_eq!((r.status, r.cache.as_str(), r.body.as_str()), (206, "HIT", "n=1"));
    assert_eq!(o.requests(), 1);

    // An unsatisfiable range on a miss: 416 from the stored copy.
    let q = "/cache/seg-3.ts?cc=max-age%3D60";
    let r = get(&e, q, &[("range", "bytes=5000-")]).await;
    assert_eq!((r.status, r.cache.as_str()), (416, "MISS"));
    assert_eq!(get(&e, q, &[]).await.cache, "HIT");

    // Not storable (no-store): the whole response is passed on, which answers a range.
    let n = "/cache/live.ts?cc=no-store&pad=100";
    let r = get(&e, n, &[("range", "bytes=0-3")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), "n=3 ae=-".len() + 100);
}
