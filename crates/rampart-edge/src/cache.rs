//! HTTP cache (RFC 9111, shared cache): a memory tier bounded by bytes.
//!
//! This module holds the semantics as pure functions of the headers and explicit
//! times (so tests drive the clock), and the store. What is built: storability
//! (§3), freshness lifetime (§4.2.1, heuristic §4.2.2 bounded), age (§4.2.3),
//! request directives (§5.2.1: no-cache, max-age, max-stale, min-fresh,
//! only-if-cached, no-store), `Vary` (§4.1), validation with `If-None-Match` /
//! `If-Modified-Since` and header refresh on 304 (§4.3.4), and invalidation by
//! unsafe methods (§4.4).

use crate::headers::list_elements;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parsed `Cache-Control` (all fields, case-insensitive).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    /// `max-stale` without a value means any staleness.
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
    /// RFC 5861.
    pub stale_if_error: Option<u64>,
    /// RFC 5861.
    pub stale_while_revalidate: Option<u64>,
}

pub fn cache_control(h: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl::default();
    for v in h.get_all(header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()) {
        for d in split_directives(v) {
            let (name, value) = match d.split_once('=') {
                Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(v.trim().trim_matches('"'))),
                None => (d.trim().to_ascii_lowercase(), None),
            };
            let secs = || value.and_then(|v| v.parse::<u64>().ok());
            match name.as_str() {
                "no-store" => cc.no_store = true,
                // Qualified forms (`no-cache="field"`, `private="field"`) are treated as
                // their unqualified, stricter forms.
                "no-cache" => cc.no_cache = true,
                "private" => cc.private = true,
                "public" => cc.public = true,
                "must-revalidate" => cc.must_revalidate = true,
                "proxy-revalidate" => cc.proxy_revalidate = true,
                // An invalid delta-seconds value is treated as 0 (stale), as §1.2.2 asks.
                "max-age" => cc.max_age = Some(secs().unwrap_or(0)),
                "s-maxage" => cc.s_maxage = Some(secs().unwrap_or(0)),
                "max-stale" => cc.max_stale = Some(secs()),
                "min-fresh" => cc.min_fresh = Some(secs().unwrap_or(0)),
                "only-if-cached" => cc.only_if_cached = true,
                "stale-if-error" => cc.stale_if_error = secs(),
                "stale-while-revalidate" => cc.stale_while_revalidate = secs(),
                _ => {}
            }
        }
    }
    cc
}

/// Split on commas outside quoted strings.
fn split_directives(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in v.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&v[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&v[start..]);
    out.into_iter().map(str::trim).filter(|d| !d.is_empty()).collect()
}

/// Statuses cacheable by default (heuristically), RFC 9110 §15.1. 206 is not here
/// because partial content is not stored yet.
pub fn heuristically_cacheable(s: u16) -> bool {
    matches!(s, 200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}

fn http_date(h: &HeaderMap, name: HeaderName) -> Option<f64> {
    let v = h.get(name)?.to_str().ok()?;
    let t = httpdate::parse_http_date(v.trim()).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
}

/// Why a response is not stored (for logs and tests), or `None` when it may be.
pub fn not_storable(
    method: &Method,
    req: &HeaderMap,
    req_cc: &CacheControl,
    status: StatusCode,
    resp: &HeaderMap,
    resp_cc: &CacheControl,
    allow_set_cookie: bool,
) -> Option<&'static str> {
    if method != Method::GET {
        return Some("method");
    }
    if req_cc.no_store || resp_cc.no_store {
        return Some("no-store");
    }
    if resp_cc.private {
        return Some("private");
    }
    if req.contains_key(header::AUTHORIZATION)
        && !(resp_cc.public || resp_cc.s_maxage.is_some() || resp_cc.must_revalidate)
    {
        return Some("authorization");
    }
    if resp.contains_key(header::SET_COOKIE) && !allow_set_cookie {
        return Some("set-cookie");
    }
    if list_elements(resp, header::VARY).any(|f| f == "*") {
        return Some("vary-star");
    }
    let code = status.as_u16();
    if code == 206 || code == 304 || status.is_informational() {
        return Some("status");
    }
    let explicit = resp_cc.max_age.is_some() || resp_cc.s_maxage.is_some() || resp.contains_key(header::EXPIRES);
    let heuristic = heuristically_cacheable(code);
    if explicit || resp_cc.public || heuristic || resp_cc.no_cache {
        None
    } else {
        Some("not-cacheable")
    }
}

/// Freshness lifetime in seconds (§4.2.1); heuristic (§4.2.2) as a fraction of the
/// time since Last-Modified, bounded by `heuristic_max`.
pub fn freshness_lifetime(status: u16, resp: &HeaderMap, cc: &CacheControl, heuristic_max: f64) -> f64 {
    if let Some(s) = cc.s_maxage {
        return s as f64;
    }
    if let Some(m) = cc.max_age {
        return m as f64;
    }
    if resp.contains_key(header::EXPIRES) {
        let date = http_date(resp, header::DATE);
        return match (http_date(resp, header::EXPIRES), date) {
            (Some(exp), Some(date)) => (exp - date).max(0.0),
            (Some(exp), None) => (exp - now_secs()).max(0.0),
            // An invalid Expires means "already expired".
            _ => 0.0,
        };
    }
    if (heuristically_cacheable(status) || cc.public)
        && let (Some(lm), Some(date)) = (
            http_date(resp, header::LAST_MODIFIED),
            http_date(resp, header::DATE).or(Some(now_secs())),
        )
    {
        return ((date - lm) * 0.1).clamp(0.0, heuristic_max);
    }
    0.0
}

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A stored response.
#[derive(Debug, Clone)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub request_time: f64,
    pub response_time: f64,
    pub date_value: f64,
    pub age_value: f64,
    pub freshness: f64,
    pub cc: CacheControl,
    /// The request header values the entry was selected by (`Vary`).
    pub vary: Vec<(HeaderName, Option<String>)>,
    /// Purge tags from the tag header.
    pub tags: Vec<String>,
    /// Soft-purged: must be validated before it is used again.
    pub purged: bool,
}

impl Entry {
    pub fn new(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        request_time: f64,
        response_time: f64,
        req: &HeaderMap,
        heuristic_max: f64,
    ) -> Entry {
        let cc = cache_control(&headers);
        // Never replay cookies (when storing is allowed at all) or hop-by-hop fields.
        headers.remove(header::SET_COOKIE);
        headers.remove(header::AGE);
        // Values read from an upstream share its connection's read buffer.
        crate::headers::detach_values(&mut headers);
        let freshness = freshness_lifetime(status.as_u16(), &headers, &cc, heuristic_max);
        let date_value = http_date(&headers, header::DATE).unwrap_or(response_time);
        Entry {
            vary: vary_values(&headers, req),
            tags: Vec::new(),
            purged: false,
            status,
            body,
            request_time,
            response_time,
            date_value,
            age_value: 0.0,
            freshness,
            cc,
            headers,
        }
    }

    /// Read purge tags from `tag_header` (comma- or space-separated values).
    pub fn with_tags(mut self, tag_header: &str) -> Entry {
        self.tags = self
            .headers
            .get_all(tag_header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(|c: char| c == ',' || c.is_whitespace()))
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect();
        self
    }

    /// Take the `Age` the origin sent into account (§4.2.3).
    pub fn with_age(mut self, age: Option<&HeaderValue>) -> Entry {
        self.age_value = age
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        self
    }

    /// current_age (§4.2.3).
    pub fn current_age(&self, now: f64) -> f64 {
        let apparent_age = (self.response_time - self.date_value).max(0.0);
        let response_delay = self.response_time - self.request_time;
        let corrected_age_value = self.age_value + response_delay;
        let corrected_initial_age = apparent_age.max(corrected_age_value);
        let resident_time = now - self.response_time;
        corrected_initial_age + resident_time
    }

    /// Whether the response must not be served stale (§4.2.4): must-revalidate, or for
    /// a shared cache proxy-revalidate and s-maxage.
    fn never_stale(&self) -> bool {
        self.cc.must_revalidate || self.cc.proxy_revalidate || self.cc.s_maxage.is_some()
    }

    /// Can this entry answer the request without contacting the origin (§4.2, §5.2.1)?
    pub fn usable(&self, req_cc: &CacheControl, now: f64) -> bool {
        if self.purged || self.cc.no_cache || req_cc.no_cache {
            return false;
        }
        let age = self.current_age(now);
        if req_cc.max_age.is_some_and(|m| age > m as f64) {
            return false;
        }
        let left = self.freshness - age;
        if let Some(min) = req_cc.min_fresh {
            return left >= min as f64;
        }
        if left > 0.0 {
            return true;
        }
        match req_cc.max_stale {
            Some(limit) if !self.never_stale() => limit.is_none_or(|m| -left <= m as f64),
            _ => false,
        }
    }

    /// Whether this entry may stand in for a failed origin (RFC 5861 `stale-if-error`):
    /// within the response's own window, else the route's, and never past
    /// must-revalidate, proxy-revalidate or s-maxage.
    pub fn serves_on_error(&self, route_window: f64, now: f64) -> bool {
        if self.never_stale() {
            return false;
        }
        let window = self.cc.stale_if_error.map_or(route_window, |w| w as f64);
        self.current_age(now) - self.freshness <= window
    }

    /// Whether this stale entry may be served while it is refreshed in the background
    /// (RFC 5861 `stale-while-revalidate`), under the same limits as `serves_on_error`.
    pub fn serves_while_revalidating(&self, route_window: f64, now: f64) -> bool {
        if self.never_stale() || self.purged || self.cc.no_cache {
            return false;
        }
        let window = self.cc.stale_while_revalidate.map_or(route_window, |w| w as f64);
        let stale_for = self.current_age(now) - self.freshness;
        stale_for > 0.0 && stale_for <= window
    }

    /// Validators for a conditional request to the origin (§4.3.1).
    pub fn validators(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut v = Vec::new();
        if let Some(etag) = self.headers.get(header::ETAG) {
            v.push((header::IF_NONE_MATCH, etag.clone()));
        }
        if let Some(lm) = self.headers.get(header::LAST_MODIFIED) {
            v.push((header::IF_MODIFIED_SINCE, lm.clone()));
        }
        v
    }

    /// Refresh from a 304 (§4.3.4): its fields replace the stored ones (except the
    /// framing fields), and the entry's times start again.
    pub fn refreshed(
        &self,
        not_modified: &HeaderMap,
        request_time: f64,
        response_time: f64,
        heuristic_max: f64,
    ) -> Entry {
        let mut headers = self.headers.clone();
        for (name, _) in not_modified {
            if matches!(
                *name,
                header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONTENT_RANGE | header::SET_COOKIE
            ) {
                continue;
            }
            headers.remove(name);
            for v in not_modified.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        headers.remove(header::AGE);
        let cc = cache_control(&headers);
        Entry {
            status: self.status,
            freshness: freshness_lifetime(self.status.as_u16(), &headers, &cc, heuristic_max),
            date_value: http_date(&headers, header::DATE).unwrap_or(response_time),
            age_value: not_modified
                .get(header::AGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0),
            request_time,
            response_time,
            cc,
            headers,
            body: self.body.clone(),
            vary: self.vary.clone(),
            tags: self.tags.clone(),
            purged: false,
        }
    }

    fn weight(&self) -> u32 {
        let h: usize = self.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
        u32::try_from(self.body.len() + h + 256).unwrap_or(u32::MAX)
    }
}

/// How a `Range` request is answered from a stored representation (RFC 9110 §14).
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No (usable) range: the whole representation, 200.
    Full,
    /// One satisfiable range: 206 with these inclusive byte positions.
    Partial(u64, u64),
    /// 416 Range Not Satisfiable.
    Unsatisfiable,
}

/// Answer a single `bytes=` range against a representation of `len` bytes. Several
/// ranges, other units or a malformed header are ignored (the full response is a
/// valid answer to them). `If-Range` must match the stored ETag (strong) or
/// Last-Modified exactly, or the range is ignored.
pub fn range(req: &HeaderMap, stored: &HeaderMap, len: u64) -> RangeAnswer {
    let Some(spec) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    if let Some(cond) = req.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        let cond = cond.trim();
        let etag = stored.get(header::ETAG).and_then(|v| v.to_str().ok());
        let lm = stored.get(header::LAST_MODIFIED).and_then(|v| v.to_str().ok());
        let matches = if cond.starts_with('"') {
            etag.is_some_and(|e| e == cond)
        } else {
            lm.is_some_and(|l| l == cond)
        };
        if !matches {
            return RangeAnswer::Full;
        }
    }
    let Some(set) = spec.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if set.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = set.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial(len.saturating_sub(n), len - 1),
            None => RangeAnswer::Full,
        },
        // bytes=A- and bytes=A-B.
        (false, _) => {
            let Some(a) = parse(first) else {
                return RangeAnswer::Full;
            };
            let b = if last.is_empty() { Some(u64::MAX) } else { parse(last) };
            match b {
                None => RangeAnswer::Full,
                Some(b) if b < a => RangeAnswer::Full,
                Some(_) if a >= len => RangeAnswer::Unsatisfiable,
                Some(b) => RangeAnswer::Partial(a, b.min(len - 1)),
            }
        }
        (true, true) => RangeAnswer::Full,
    }
}

/// The request values of the fields a response varies on, normalised (trimmed,
/// lower-cased, whitespace around commas removed).
fn vary_values(resp: &HeaderMap, req: &HeaderMap) -> Vec<(HeaderName, Option<String>)> {
    let mut names: Vec<HeaderName> = list_elements(resp, header::VARY)
        .filter_map(|f| HeaderName::from_bytes(f.as_bytes()).ok())
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
        .into_iter()
        .map(|n| {
            let v = normalised(req, &n);
            (n, v)
        })
        .collect()
}

pub(crate) fn normalised(req: &HeaderMap, name: &HeaderName) -> Option<String> {
    let vals: Vec<String> = list_elements(req, name).map(str::to_ascii_lowercase).collect();
    (!vals.is_empty()).then(|| vals.join(","))
}

/// Whether a stored variant matches a request (§4.1).
fn selects(e: &Entry, req: &HeaderMap) -> bool {
    e.vary.iter().all(|(n, v)| normalised(req, n) == *v)
}

const MAX_VARIANTS: usize = 16;

/// One origin fetch per key: the first miss leads, later ones wait for it.
pub enum Fetch {
    /// Go to the origin; dropping the guard (once the response is stored, found not
    /// storable, or failed) releases the waiters.
    Lead(Leader),
    /// Another request is fetching this key: wait for it, then look again.
    Follow(tokio::sync::watch::Receiver<bool>),
}

pub struct Leader {
    key: String,
    inflight: Arc<Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<bool>>>>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inflight.lock() {
            m.remove(&self.key);
        }
        let _ = self.done.send(true);
    }
}

/// Wait for a leader, at most `limit`; true if it finished (or gave up) in time.
pub async fn follow(mut rx: tokio::sync::watch::Receiver<bool>, limit: Duration) -> bool {
    // A closed channel means the leader is gone: done as well.
    tokio::time::timeout(limit, rx.wait_for(|done| *done)).await.is_ok()
}

/// What a purge selects.
pub enum Purge {
    /// One URL, every variant.
    Url(String),
    /// Every URL starting with this (scheme://host/path...).
    Prefix(String),
    /// Every object carrying this tag.
    Tag(String),
    All,
}

/// Counters for `/admin/cache/stats`, registered as `rampart_cache_*` metrics.
#[derive(Default, Clone)]
pub struct Stats {
    pub hit: Counter,
    pub miss: Counter,
    pub expired: Counter,
    pub revalidated: Counter,
    pub stale: Counter,
    pub bypass: Counter,
    pub stored: Counter,
    pub evicted: Counter,
    pub disk_evicted: Counter,
    pub objects: Gauge,
    pub bytes: Gauge,
}

impl Stats {
    pub fn count(&self, status: &str) {
        let c = match status {
            "HIT" => &self.hit,
            "MISS" => &self.miss,
            "EXPIRED" => &self.expired,
            "REVALIDATED" => &self.revalidated,
            "STALE" | "UPDATING" => &self.stale,
            _ => &self.bypass,
        };
        c.inc();
    }
}

type Variants = Arc<Mutex<Vec<Arc<Entry>>>>;

/// The memory tier: one moka entry per URL holding its variants, weighed in bytes,
/// with TinyLFU admission and eviction.
pub struct Store {
    map: moka::sync::Cache<String, Variants>,
    /// Keys being fetched from the origin right now (bounded by requests in flight).
    inflight: Arc<Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<bool>>>>,
    pub max_object: usize,
    pub heuristic_max: f64,
    pub tag_header: String,
    pub capacity: u64,
    pub stats: Stats,
    /// The optional disk tier.
    pub disk: Option<disk::Disk>,
}

impl Store {
    pub fn new(
        capacity: u64,
        max_object: usize,
        heuristic_max: Duration,
        tag_header: &str,
        stats: Stats,
        disk: Option<disk::Disk>,
    ) -> Store {
        let count = stats.evicted.clone();
        Store {
            map: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .weigher(|_k: &String, v: &Variants| {
                    v.lock().map_or(256, |list| {
                        list.iter().map(|e| e.weight()).fold(0u32, u32::saturating_add)
                    })
                })
                .eviction_listener(move |_k, _v, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        count.inc();
                    }
                })
                .build(),
            inflight: Arc::default(),
            max_object,
            heuristic_max: heuristic_max.as_secs_f64(),
            tag_header: tag_header.to_string(),
            capacity,
            stats,
            disk,
        }
    }

    /// Put a response found on disk back into memory (without writing it again).
    pub fn promote(&self, key: &str, entry: Entry) -> Arc<Entry> {
        let entry = Arc::new(entry);
        self.insert_memory(key, entry.clone());
        entry
    }

    /// Lead the origin fetch of `key`, or follow the request already leading it.
    pub fn fetch(&self, key: &str) -> Fetch {
        let mut m = crate::lock(&self.inflight);
        if let Some(rx) = m.get(key) {
            return Fetch::Follow(rx.clone());
        }
        let (done, rx) = tokio::sync::watch::channel(false);
        m.insert(key.to_string(), rx);
        Fetch::Lead(Leader {
            key: key.to_string(),
            inflight: self.inflight.clone(),
            done,
        })
    }

    /// Purge matching objects: hard removes them; soft marks them stale, so the next
    /// request validates them with the origin. Returns the number of objects (variants).
    pub fn purge(&self, what: &Purge, soft: bool) -> usize {
        let keys: Vec<String> = match what {
            // A URL's key, and its keys extended with key headers or cookies.
            Purge::Url(k) => self
                .map
                .iter()
                .filter(|(key, _)| {
                    **key == *k || key.strip_prefix(k.as_str()).is_some_and(|rest| rest.starts_with('\n'))
                })
                .map(|(key, _)| (*key).clone())
                .collect(),
            Purge::Prefix(p) => self
                .map
                .iter()
                .filter(|(k, _)| k.starts_with(p.as_str()))
                .map(|(k, _)| (*k).clone())
                .collect(),
            Purge::Tag(t) => self
                .map
                .iter()
                .filter(|(_, v)| v.lock().is_ok_and(|l| l.iter().any(|e| e.tags.iter().any(|x| x == t))))
                .map(|(k, _)| (*k).clone())
                .collect(),
            Purge::All => self.map.iter().map(|(k, _)| (*k).clone()).collect(),
        };
        // The disk tier: files go, or are marked stale.
        let on_disk = match (&self.disk, what) {
            (None, _) => 0,
            (Some(d), Purge::Url(k)) => d.purge(
                &|key| key == k || key.strip_prefix(k.as_str()).is_some_and(|r| r.starts_with('\n')),
                None,
                soft,
            ),
            (Some(d), Purge::Prefix(p)) => d.purge(&|key| key.starts_with(p.as_str()), None, soft),
            (Some(d), Purge::Tag(t)) => d.purge(&|_| true, Some(t), soft),
            (Some(d), Purge::All) => d.purge(&|_| true, None, soft),
        };
        let mut n = 0;
        for k in keys {
            let Some(variants) = self.map.get(&k) else { continue };
            let Ok(mut list) = variants.lock() else { continue };
            let selected = |e: &Entry| match what {
                Purge::Tag(t) => e.tags.iter().any(|x| x == t),
                _ => true,
            };
            if soft {
                for e in list.iter_mut().filter(|e| selected(e)) {
                    let mut stale = (**e).clone();
                    stale.purged = true;
                    *e = Arc::new(stale);
                    n += 1;
                }
            } else {
                let before = list.len();
                list.retain(|e| !selected(e));
                n += before - list.len();
                if list.is_empty() {
                    drop(list);
                    self.map.invalidate(&k);
                }
            }
        }
        // Objects only on disk count too.
        n.max(on_disk)
    }

    /// The stored variant that matches the request, if any.
    pub fn lookup(&self, key: &str, req: &HeaderMap) -> Option<Arc<Entry>> {
        let variants = self.map.get(key)?;
        let list = variants.lock().ok()?;
        list.iter().find(|e| selects(e, req)).cloned()
    }

    pub fn insert(&self, key: &str, entry: Entry) {
        let entry = Arc::new(entry);
        if let Some(d) = &self.disk {
            d.store(key, entry.clone());
        }
        self.insert_memory(key, entry);
    }

    fn insert_memory(&self, key: &str, entry: Arc<Entry>) {
        let existing = self.map.get(key);
        let list = existing.unwrap_or_default();
        if let Ok(mut l) = list.lock() {
            l.retain(|e| e.vary != entry.vary);
            l.insert(0, entry);
            l.truncate(MAX_VARIANTS);
        }
        // Re-insert so moka re-weighs the entry.
        self.map.insert(key.to_string(), list);
    }

    /// Remove every variant of a URL (§4.4), in both tiers.
    pub fn invalidate(&self, key: &str) {
        self.map.invalidate(key);
        if let Some(d) = &self.disk {
            d.purge(&|k| k == key, None, false);
        }
    }

    /// Refresh the object and byte gauges (before a scrape or a stats answer).
    pub fn refresh_gauges(&self) {
        self.stats
            .objects
            .set(i64::try_from(self.objects()).unwrap_or(i64::MAX));
        self.stats.bytes.set(i64::try_from(self.bytes()).unwrap_or(i64::MAX));
    }

    pub fn objects(&self) -> u64 {
        self.map.run_pending_tasks();
        self.map.entry_count()
    }

    pub fn bytes(&self) -> u64 {
        self.map.run_pending_tasks();
        self.map.weighted_size()
    }
}

/// The cache key: scheme, host (lower case, without port) and path with query.
pub fn key(tls: bool, host: &str, path_and_query: &str) -> String {
    let host = crate::routing::strip_port(host).to_ascii_lowercase();
    format!("{}://{host}{path_and_query}", if tls { "https" } else { "http" })
}

/// The key under a route's policy: the query reduced (ignored or allow-listed
/// parameters) and sorted as configured, then the values of the key headers and
/// cookies. Without options it is [`key`] of the path and query as received.
pub fn policy_key(
    p: &rampart_config::RouteCache,
    tls: bool,
    host: &str,
    path: &str,
    query: Option<&str>,
    req: &HeaderMap,
) -> String {
    let mut params: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .filter(|kv| {
            let name = kv.split_once('=').map_or(*kv, |(k, _)| k);
            match &p.query_allow {
                Some(allow) => allow.iter().any(|a| a == name),
                None => !p.ignore_query.iter().any(|i| i == name),
            }
        })
        .collect();
    if p.sort_query {
        params.sort_unstable();
    }
    let mut k = if params.is_empty() {
        key(tls, host, path)
    } else {
        key(tls, host, &format!("{path}?{}", params.join("&")))
    };
    for h in &p.key_headers {
        let v = req.get(h.as_str()).and_then(|v| v.to_str().ok()).unwrap_or("");
        k.push_str(&format!("\nh:{}={v}", h.to_ascii_lowercase()));
    }
    for c in &p.key_cookies {
        k.push_str(&format!("\nc:{c}={}", crate::headers::cookie(req, c).unwrap_or("")));
    }
    k
}

/// Whether a request bypasses the cache under its route's policy.
pub fn bypassed(p: &rampart_config::RouteCache, req: &HeaderMap) -> bool {
    p.bypass_headers.iter().any(|h| req.contains_key(h.as_str()))
        || p.bypass_cookies
            .iter()
            .any(|c| crate::headers::cookie(req, c).is_some())
}

/// Apply a route's TTL override and bounds to a stored response's freshness.
pub fn apply_ttl(p: &rampart_config::RouteCache, mut e: Entry) -> Entry {
    if let Some(ttl) = p.ttl {
        e.freshness = ttl.get().as_secs_f64();
    }
    if let Some(min) = p.min_ttl {
        e.freshness = e.freshness.max(min.get().as_secs_f64());
    }
    if let Some(max) = p.max_ttl {
        e.freshness = e.freshness.min(max.get().as_secs_f64());
    }
    e
}

pub mod disk;

#[cfg(test)]
mod tests;
