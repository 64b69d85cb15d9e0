//! RFC 9111 cases, each with explicit times.
use super::*;

fn h(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            m.append(k, v);
        }
    }
    m
}

const DAY: f64 = 86_400.0;

fn storable(req: &[(&str, &str)], status: u16, resp: &[(&str, &str)]) -> Option<&'static str> {
    let (req, resp) = (h(req), h(resp));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    not_storable(
        &Method::GET,
        &req,
        &cache_control(&req),
        status,
        &resp,
        &cache_control(&resp),
        false,
    )
}

#[test]
fn cache_control_parsing() {
    let cc = cache_control(&h(&[
        ("cache-control", "Public, MAX-AGE=60"),
        ("cache-control", "s-maxage=\"120\", no-cache=\"x,y\""),
    ]));
    assert!(cc.public && cc.no_cache);
    assert_eq!((cc.max_age, cc.s_maxage), (Some(60), Some(120)));
    // §1.2.2: an invalid delta-seconds is treated as 0.
    assert_eq!(cache_control(&h(&[("cache-control", "max-age=abc")])).max_age, Some(0));
    assert_eq!(
        cache_control(&h(&[("cache-control", "max-stale")])).max_stale,
        Some(None)
    );
    assert_eq!(
        cache_control(&h(&[("cache-control", "max-stale=5")])).max_stale,
        Some(Some(5))
    );
}

#[test]
fn storability_section_3() {
    assert_eq!(storable(&[], 200, &[("cache-control", "max-age=60")]), None);
    assert_eq!(storable(&[], 200, &[("cache-control", "no-store")]), Some("no-store"));
    assert_eq!(
        storable(
            &[("cache-control", "no-store")],
            200,
            &[("cache-control", "max-age=60")]
        ),
        Some("no-store")
    );
    assert_eq!(
        storable(&[], 200, &[("cache-control", "private, max-age=60")]),
        Some("private")
    );
    assert_eq!(
        storable(&[], 200, &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]),
        Some("set-cookie")
    );
    assert_eq!(
        storable(&[], 200, &[("cache-control", "max-age=60"), ("vary", "accept, *")]),
        Some("vary-star")
    );
    // §3.5: with Authorization only public, s-maxage or must-revalidate allow storing.
    assert_eq!(
        storable(&[("authorization", "x")], 200, &[("cache-control", "max-age=60")]),
        Some("authorization")
    );
    assert_eq!(
        storable(
            &[("authorization", "x")],
            200,
            &[("cache-control", "public, max-age=60")]
        ),
        None
    );
    assert_eq!(
        storable(&[("authorization", "x")], 200, &[("cache-control", "s-maxage=60")]),
        None
    );
    assert_eq!(
        storable(
            &[("authorization", "x")],
            200,
            &[("cache-control", "must-revalidate, max-age=60")]
        ),
        None
    );
    // Heuristically cacheable statuses may be stored without explicit freshness...
    assert_eq!(storable(&[], 404, &[]), None);
    // ...others need it.
    assert_eq!(storable(&[], 302, &[]), Some("not-cacheable"));
    assert_eq!(storable(&[], 302, &[("cache-control", "max-age=60")]), None);
    assert_eq!(storable(&[], 206, &[("cache-control", "max-age=60")]), Some("status"));
    // no-cache responses are stored (and revalidated on every use).
    assert_eq!(storable(&[], 302, &[("cache-control", "no-cache")]), None);
}

#[test]
fn freshness_section_4_2_1() {
    let f = |status: u16, resp: &[(&str, &str)]| {
        let resp = h(resp);
        freshness_lifetime(status, &resp, &cache_control(&resp), DAY)
    };
    // s-maxage overrides max-age in a shared cache; max-age overrides Expires.
    assert_eq!(f(200, &[("cache-control", "max-age=10, s-maxage=30")]), 30.0);
    assert_eq!(
        f(
            200,
            &[
                ("cache-control", "max-age=10"),
                ("expires", "Sun, 06 Nov 1994 09:49:37 GMT"),
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT")
            ]
        ),
        10.0
    );
    assert_eq!(
        f(
            200,
            &[
                ("expires", "Sun, 06 Nov 1994 09:49:37 GMT"),
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT")
            ]
        ),
        3600.0
    );
    // An invalid Expires (like "0") means already expired.
    assert_eq!(
        f(200, &[("expires", "0"), ("date", "Sun, 06 Nov 1994 08:49:37 GMT")]),
        0.0
    );
    // §4.2.2 heuristic: 10% of the time since Last-Modified, bounded.
    let lm = [
        ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("date", "Mon, 07 Nov 1994 08:49:37 GMT"),
    ];
    assert_eq!(f(200, &lm), 8640.0);
    let old = [
        ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("date", "Sun, 06 Nov 2004 08:49:37 GMT"),
    ];
    assert_eq!(f(200, &old), DAY, "bounded by heuristic_max");
    // No heuristic for a status that is not heuristically cacheable.
    assert_eq!(f(302, &lm), 0.0);
}

fn entry(resp: &[(&str, &str)], request_time: f64, response_time: f64) -> Entry {
    Entry::new(
        StatusCode::OK,
        h(resp),
        Bytes::from_static(b"x"),
        request_time,
        response_time,
        &HeaderMap::new(),
        DAY,
    )
}

#[test]
fn age_section_4_2_3() {
    // Date 1000, the response arrives at 1002 (request sent at 1001), Age: 5 from upstream.
    let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1000));
    let e = entry(&[("date", &date), ("cache-control", "max-age=60")], 1001.0, 1002.0)
        .with_age(Some(&HeaderValue::from_static("5")));
    // apparent_age = 2; corrected_age_value = 5 + 1 = 6; initial = 6; resident 10 → 16.
    assert_eq!(e.current_age(1012.0), 16.0);
    // Without an Age header, the apparent age (clock skew bounded below by 0) counts.
    let e = entry(&[("date", &date), ("cache-control", "max-age=60")], 1001.0, 1002.0);
    assert_eq!(e.current_age(1002.0), 2.0);
    // A Date in the future does not make the age negative.
    let future = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(5000));
    let e = entry(&[("date", &future)], 1000.0, 1000.0);
    assert_eq!(e.current_age(1000.0), 0.0);
}

#[test]
fn serving_with_request_directives_section_5_2_1() {
    let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1000));
    let e = entry(&[("date", &date), ("cache-control", "max-age=60")], 1000.0, 1000.0);
    let none = CacheControl::default();
    assert!(e.usable(&none, 1059.0), "fresh");
    assert!(!e.usable(&none, 1061.0), "stale");
    let rc = |v: &str| cache_control(&h(&[("cache-control", v)]));
    assert!(!e.usable(&rc("no-cache"), 1001.0), "request no-cache forces validation");
    assert!(!e.usable(&rc("max-age=10"), 1020.0), "older than the client accepts");
    assert!(e.usable(&rc("max-age=30"), 1020.0));
    assert!(!e.usable(&rc("min-fresh=50"), 1020.0), "only 40s of freshness left");
    assert!(e.usable(&rc("max-stale=10"), 1065.0), "5s stale is acceptable");
    assert!(!e.usable(&rc("max-stale=10"), 1075.0));
    assert!(e.usable(&rc("max-stale"), 5000.0), "any staleness");
    // §4.2.4: must-revalidate (and s-maxage in a shared cache) forbid serving stale.
    let strict = entry(
        &[("date", &date), ("cache-control", "max-age=60, must-revalidate")],
        1000.0,
        1000.0,
    );
    assert!(!strict.usable(&rc("max-stale"), 1065.0));
    let shared = entry(&[("date", &date), ("cache-control", "s-maxage=60")], 1000.0, 1000.0);
    assert!(!shared.usable(&rc("max-stale"), 1065.0));
    // A no-cache response is never used without validation.
    let nc = entry(
        &[("date", &date), ("cache-control", "no-cache, max-age=600")],
        1000.0,
        1000.0,
    );
    assert!(!nc.usable(&none, 1001.0));
}

#[test]
fn stale_if_error_rfc_5861() {
    let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1000));
    let e = entry(
        &[("date", &date), ("cache-control", "max-age=60, stale-if-error=30")],
        1000.0,
        1000.0,
    );
    assert!(e.serves_on_error(0.0, 1080.0), "20s stale, inside its own 30s window");
    assert!(!e.serves_on_error(0.0, 1100.0), "40s stale");
    let plain = entry(&[("date", &date), ("cache-control", "max-age=60")], 1000.0, 1000.0);
    assert!(!plain.serves_on_error(0.0, 1061.0), "no window");
    assert!(plain.serves_on_error(120.0, 1100.0), "the route's window");
    let strict = entry(
        &[
            ("date", &date),
            ("cache-control", "max-age=60, must-revalidate, stale-if-error=30"),
        ],
        1000.0,
        1000.0,
    );
    assert!(!strict.serves_on_error(300.0, 1061.0), "must-revalidate wins");
}

#[test]
fn refresh_on_304_section_4_3_4() {
    let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1000));
    let e = entry(
        &[
            ("date", &date),
            ("cache-control", "max-age=10"),
            ("etag", "\"v1\""),
            ("x-a", "old"),
            ("content-length", "1"),
        ],
        1000.0,
        1000.0,
    );
    assert_eq!(
        e.validators()[0],
        (header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\""))
    );
    let later = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(2000));
    let nm = h(&[
        ("date", &later),
        ("cache-control", "max-age=100"),
        ("x-a", "new"),
        ("content-length", "0"),
    ]);
    let r = e.refreshed(&nm, 2000.0, 2000.0, DAY);
    assert_eq!(r.headers["x-a"], "new", "stored fields are replaced by the 304's");
    assert_eq!(r.headers["content-length"], "1", "framing fields are not");
    assert_eq!(r.headers["etag"], "\"v1\"");
    assert_eq!(r.freshness, 100.0);
    assert!(r.usable(&CacheControl::default(), 2050.0));
    assert_eq!(r.body, e.body);
}

#[test]
fn vary_selects_variants_section_4_1() {
    let store = Store::new(
        1 << 20,
        1 << 20,
        Duration::from_secs(86_400),
        "cache-tag",
        Stats::default(),
        None,
    );
    let gz = h(&[("accept-encoding", "GZIP")]);
    let br = h(&[("accept-encoding", "br")]);
    let resp = [("cache-control", "max-age=60"), ("vary", "Accept-Encoding")];
    let mk = |req: &HeaderMap, body: &'static [u8]| {
        Entry::new(StatusCode::OK, h(&resp), Bytes::from_static(body), 0.0, 0.0, req, DAY)
    };
    store.insert("k", mk(&gz, b"gzip body"));
    store.insert("k", mk(&br, b"br body"));
    assert_eq!(
        store
            .lookup("k", &h(&[("accept-encoding", "gzip")]))
            .map(|e| e.body.clone()),
        Some(Bytes::from_static(b"gzip body")),
        "normalised case"
    );
    assert_eq!(
        store.lookup("k", &br).map(|e| e.body.clone()),
        Some(Bytes::from_static(b"br body"))
    );
    assert!(
        store.lookup("k", &HeaderMap::new()).is_none(),
        "absent field is its own variant"
    );
    store.invalidate("k");
    assert!(store.lookup("k", &gz).is_none(), "invalidation removes every variant");
}

#[test]
fn stored_entries_never_keep_cookies() {
    let e = Entry::new(
        StatusCode::OK,
        h(&[("set-cookie", "s=1"), ("cache-control", "max-age=60")]),
        Bytes::new(),
        0.0,
        0.0,
        &HeaderMap::new(),
        DAY,
    );
    assert!(!e.headers.contains_key(header::SET_COOKIE));
}

/// Header values read from an upstream are views into its connection's read
/// buffer; a stored entry must not keep that buffer (16 KiB per entry) alive.
#[test]
fn stored_entries_own_their_header_values() {
    let mut head = vec![b'x'; 16 * 1024];
    head[..15].copy_from_slice(b"max-age=60\"abc\"");
    let read = Bytes::from(head);
    let mut m = HeaderMap::new();
    m.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_maybe_shared(read.slice(0..10)).unwrap(),
    );
    m.insert(
        header::ETAG,
        HeaderValue::from_maybe_shared(read.slice(10..15)).unwrap(),
    );
    let e = Entry::new(StatusCode::OK, m, Bytes::new(), 0.0, 0.0, &HeaderMap::new(), DAY);
    assert_eq!(e.headers[header::ETAG], "\"abc\"");
    assert_eq!(e.freshness, 60.0);
    let range = read.as_ptr_range();
    for v in e.headers.values() {
        assert!(
            !range.contains(&v.as_bytes().as_ptr()),
            "{v:?} points into the read buffer"
        );
    }
}

#[test]
fn ranges_rfc_9110_section_14() {
    let r = |spec: &str, len: u64| range(&h(&[("range", spec)]), &HeaderMap::new(), len);
    assert_eq!(r("bytes=0-99", 1000), RangeAnswer::Partial(0, 99));
    assert_eq!(r("bytes=900-", 1000), RangeAnswer::Partial(900, 999));
    assert_eq!(r("bytes=-100", 1000), RangeAnswer::Partial(900, 999));
    assert_eq!(
        r("bytes=-5000", 1000),
        RangeAnswer::Partial(0, 999),
        "suffix longer than the body"
    );
    assert_eq!(
        r("bytes=990-2000", 1000),
        RangeAnswer::Partial(990, 999),
        "clamped to the end"
    );
    assert_eq!(r("bytes=1000-", 1000), RangeAnswer::Unsatisfiable);
    assert_eq!(r("bytes=-0", 1000), RangeAnswer::Unsatisfiable);
    assert_eq!(r("bytes=5-2", 1000), RangeAnswer::Full, "invalid: ignored");
    assert_eq!(
        r("bytes=0-1,5-6", 1000),
        RangeAnswer::Full,
        "several ranges: full response"
    );
    assert_eq!(r("items=0-1", 1000), RangeAnswer::Full);
    assert_eq!(range(&HeaderMap::new(), &HeaderMap::new(), 10), RangeAnswer::Full);
    // If-Range: the range applies only when the validator matches.
    let stored = h(&[("etag", "\"v1\""), ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")]);
    let with = |ir: &str| range(&h(&[("range", "bytes=0-0"), ("if-range", ir)]), &stored, 10);
    assert_eq!(with("\"v1\""), RangeAnswer::Partial(0, 0));
    assert_eq!(with("\"v2\""), RangeAnswer::Full);
    assert_eq!(with("Sun, 06 Nov 1994 08:49:37 GMT"), RangeAnswer::Partial(0, 0));
    assert_eq!(with("Mon, 07 Nov 1994 08:49:37 GMT"), RangeAnswer::Full);
}

#[test]
fn keys() {
    assert_eq!(key(false, "Example.TEST:8080", "/a?b=1"), "http://example.test/a?b=1");
    assert_eq!(key(true, "example.test", "/"), "https://example.test/");
}
