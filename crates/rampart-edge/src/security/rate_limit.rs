//! Rate limiting: GCRA (the generic cell rate algorithm) per key, in a bounded,
//! sharded table.
//!
//! A key's whole state is its theoretical arrival time (TAT). A state whose TAT has
//! passed is the same as no state at all, so the table can drop such entries at any
//! time without changing a single decision: that is how it stays within `max_keys`.
//! When a shard is full of live entries (a flood of distinct keys inside the burst
//! window), new keys share one overflow bucket with the same quota, so the flood is
//! still limited and memory stays bounded.
//!
//! The table sits behind [`Store`], so a store shared by a fleet of edges can take
//! its place. Time is passed in (nanoseconds on a monotonic clock), so tests control
//! it exactly.
//!
//! governor (the crate DESIGN.md suggests) was evaluated: its keyed store has no size
//! bound and no way to ask whether a key is new, so bounding it needs an O(n)
//! `retain_recent` sweep on the request path; the GCRA itself is twenty lines.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Mutex;
use std::time::Duration;

/// A rate (`count` per `period`) and a burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Nanoseconds between requests at the sustained rate.
    interval: u64,
    /// How far ahead of now the TAT may run: (burst - 1) intervals.
    tolerance: u64,
    pub count: u32,
    pub period: Duration,
    pub burst: u32,
}

impl Quota {
    /// `N/s`, `N/m` or `N/h`, and a burst (default N).
    pub fn parse(rate: &str, burst: Option<u32>) -> Result<Quota, String> {
        let (n, unit) = rate
            .split_once('/')
            .ok_or_else(|| format!("`{rate}`: write N/s, N/m or N/h"))?;
        let count: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| format!("`{rate}`: the count must be a whole number above 0"))?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(format!("`{rate}`: the unit must be s, m or h")),
        };
        let burst = burst.unwrap_or(count);
        if burst == 0 {
            return Err("burst must be at least 1".into());
        }
        let interval = u64::try_from(period.as_nanos() / u128::from(count))
            .unwrap_or(u64::MAX)
            .max(1);
        Ok(Quota {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst - 1)),
            count,
            period,
            burst,
        })
    }
}

/// A decision, with what the `RateLimit` header reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// Further requests allowed right now.
        remaining: u32,
        /// Nanoseconds until the full burst is available again.
        reset: u64,
    },
    Deny {
        /// Nanoseconds until one request would be allowed.
        retry_after: u64,
        reset: u64,
    },
}

/// GCRA on one TAT.
fn gcra(tat: &mut u64, now: u64, q: &Quota) -> Decision {
    let start = (*tat).max(now);
    if start - now > q.tolerance {
        return Decision::Deny {
            retry_after: start - now - q.tolerance,
            reset: start - now,
        };
    }
    *tat = start.saturating_add(q.interval);
    let ahead = *tat - now;
    let remaining = if ahead > q.tolerance {
        0
    } else {
        u32::try_from((q.tolerance - ahead) / q.interval + 1).unwrap_or(u32::MAX)
    };
    Decision::Allow {
        remaining,
        reset: ahead,
    }
}

/// Where limit state lives. One per rule.
pub trait Store: Send + Sync {
    fn check(&self, key: &[u8], now: u64, q: &Quota) -> Decision;
    /// Keys tracked right now.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const SHARDS: usize = 16;

struct Shard {
    tats: HashMap<u64, u64>,
    /// While the shard is full of live entries: no sweep before this time.
    full_until: u64,
}

/// The in-process store: `max_keys` entries at most, plus the overflow bucket.
pub struct LocalStore {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    overflow: Mutex<u64>,
    hasher: RandomState,
}

impl LocalStore {
    pub fn new(max_keys: usize) -> LocalStore {
        let per_shard = max_keys.div_ceil(SHARDS).max(1);
        LocalStore {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        tats: HashMap::new(),
                        full_until: 0,
                    })
                })
                .collect(),
            per_shard,
            overflow: Mutex::new(0),
            hasher: RandomState::new(),
        }
    }
}

impl Store for LocalStore {
    fn check(&self, key: &[u8], now: u64, q: &Quota) -> Decision {
        let mut h = self.hasher.build_hasher();
        h.write(key);
        let hash = h.finish();
        let Some(shard) = self.shards.get(usize::try_from(hash % SHARDS as u64).unwrap_or(0)) else {
            return Decision::Allow { remaining: 0, reset: 0 };
        };
        let mut s = crate::lock(shard);
        if let Some(tat) = s.tats.get_mut(&hash) {
            return gcra(tat, now, q);
        }
        if s.tats.len() >= self.per_shard && now >= s.full_until {
            // Entries whose TAT has passed hold no information: drop them.
            s.tats.retain(|_, tat| *tat > now);
            if s.tats.len() >= self.per_shard {
                s.full_until = s.tats.values().copied().min().unwrap_or(now);
            }
        }
        if s.tats.len() >= self.per_shard {
            drop(s);
            let mut tat = crate::lock(&self.overflow);
            return gcra(&mut tat, now, q);
        }
        let mut tat = 0;
        let d = gcra(&mut tat, now, q);
        s.tats.insert(hash, tat);
        d
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map_or(0, |s| s.tats.len())).sum()
    }
}

/// `t` in nanoseconds on the process's monotonic clock (0 before its first use): a
/// request is checked at the time it started, with no clock read of its own.
pub fn nanos_at(t: std::time::Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(t.saturating_duration_since(*epoch).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn quotas() {
        let q = Quota::parse("10/s", Some(5)).unwrap();
        assert_eq!((q.interval, q.tolerance), (S / 10, 4 * S / 10));
        assert_eq!(Quota::parse("60/m", None).unwrap().burst, 60);
        assert!(Quota::parse("0/s", None).is_err());
        assert!(Quota::parse("5/d", None).is_err());
        assert!(Quota::parse("5", None).is_err());
        assert!(Quota::parse("5/s", Some(0)).is_err());
    }

    #[test]
    fn burst_then_the_sustained_rate_exactly() {
        let store = LocalStore::new(100);
        let q = Quota::parse("10/s", Some(5)).unwrap();
        let t0 = 1000 * S;
        // The burst: five at once, with the remaining count going down.
        for left in (0..5).rev() {
            assert!(matches!(store.check(b"k", t0, &q), Decision::Allow { remaining, .. } if remaining == left));
        }
        // The sixth waits exactly one interval.
        assert_eq!(
            store.check(b"k", t0, &q),
            Decision::Deny {
                retry_after: S / 10,
                reset: 5 * S / 10
            }
        );
        assert!(matches!(store.check(b"k", t0 + S / 10 - 1, &q), Decision::Deny { .. }));
        assert!(matches!(store.check(b"k", t0 + S / 10, &q), Decision::Allow { .. }));
        // Over ten seconds at exactly the rate, every request passes; one more is refused.
        let start = t0 + S / 10;
        for i in 1..=100 {
            assert!(
                matches!(store.check(b"k", start + i * S / 10, &q), Decision::Allow { .. }),
                "{i}"
            );
        }
        assert!(matches!(
            store.check(b"k", start + 100 * S / 10, &q),
            Decision::Deny { .. }
        ));
        // Other keys are independent.
        assert!(matches!(
            store.check(b"other", t0, &q),
            Decision::Allow { remaining: 4, .. }
        ));
    }

    #[test]
    fn a_flood_of_distinct_keys_cannot_grow_the_table() {
        let store = LocalStore::new(1000);
        let q = Quota::parse("1/s", Some(1)).unwrap();
        let now = 5 * S;
        let mut allowed = 0;
        for i in 0..200_000u32 {
            if matches!(store.check(&i.to_be_bytes(), now, &q), Decision::Allow { .. }) {
                allowed += 1;
            }
        }
        assert!(store.len() <= 1000 + SHARDS, "{}", store.len());
        // The tracked keys got their one request; the rest shared one bucket.
        assert!(allowed <= store.len() + 1, "{allowed}");
        // Once their state has expired, the entries make room again.
        assert!(matches!(store.check(b"late", now + 2 * S, &q), Decision::Allow { .. }));
        assert!(store.len() <= 1000 + SHARDS);
    }
}

/// What a rule is keyed by.
#[derive(Clone, Debug, PartialEq, Eq)]
enum KeyKind {
    Ip,
    IpPath,
    Route,
    /// A header's value; requests without it are not limited by the rule.
    Header(http::HeaderName),
    /// An API key header: its value keys the limit (hashed, never kept as is);
    /// requests without one are keyed by client IP.
    ApiKey(http::HeaderName),
    /// A cookie's value; requests without it are not limited by the rule.
    Cookie(String),
}

fn key_kind(s: &str) -> Result<KeyKind, String> {
    let header =
        |n: &str| http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("`{n}` is not a header name"));
    Ok(match s.split_once(':') {
        None if s == "ip" => KeyKind::Ip,
        None if s == "ip_path" => KeyKind::IpPath,
        None if s == "route" => KeyKind::Route,
        Some(("header", n)) => KeyKind::Header(header(n)?),
        Some(("api_key", n)) => KeyKind::ApiKey(header(n)?),
        Some(("cookie", n)) if !n.is_empty() => KeyKind::Cookie(n.to_string()),
        _ => {
            return Err(format!(
                "`{s}`: use ip, ip_path, route, header:NAME, api_key:NAME or cookie:NAME"
            ));
        }
    })
}

/// A compiled `[[rate_limit]]` rule with its store.
pub struct Rule {
    pub name: std::sync::Arc<str>,
    key: KeyKind,
    pub quota: Quota,
    pub shadow: bool,
    exempt_ips: Vec<rampart_config::Cidr>,
    exempt_paths: Vec<String>,
    store: std::sync::Arc<dyn Store>,
    /// What must not change for the store to be kept across a reload.
    fingerprint: String,
    /// `RateLimit-Policy` for this rule.
    pub policy: http::HeaderValue,
}

impl Rule {
    /// Compile rule `i`; `previous` is the same-named rule of the running config,
    /// whose store (its counts) is kept when the rule's quota and key are unchanged.
    pub fn build(
        cfg: &rampart_config::RateLimit,
        i: usize,
        previous: Option<&Rule>,
    ) -> Result<Rule, Vec<(String, String)>> {
        let at = format!("rate_limit[{i}]");
        let mut errs = Vec::new();
        if cfg.name.trim().is_empty() {
            errs.push((format!("{at}.name"), "must not be empty".to_string()));
        }
        let key = key_kind(&cfg.key).map_err(|e| errs.push((format!("{at}.key"), e))).ok();
        let quota = Quota::parse(&cfg.rate, cfg.burst)
            .map_err(|e| errs.push((format!("{at}.rate"), e)))
            .ok();
        if !(1..=10_000_000).contains(&cfg.max_keys) {
            errs.push((format!("{at}.max_keys"), "must be between 1 and 10000000".to_string()));
        }
        let (exempt_ips, bad) = rampart_config::parse_cidrs(&cfg.exempt_ips, &format!("{at}.exempt_ips"));
        errs.extend(bad);
        for (j, p) in cfg.exempt_paths.iter().enumerate() {
            if !p.starts_with('/') {
                errs.push((format!("{at}.exempt_paths[{j}]"), "must start with /".to_string()));
            }
        }
        let (Some(key), Some(quota)) = (key, quota) else {
            return Err(errs);
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        let fingerprint = format!("{:?}|{:?}|{}", key, quota, cfg.max_keys);
        let store = match previous.filter(|p| p.fingerprint == fingerprint) {
            Some(p) => p.store.clone(),
            None => std::sync::Arc::new(LocalStore::new(cfg.max_keys)) as std::sync::Arc<dyn Store>,
        };
        let policy = http::HeaderValue::from_str(&format!(
            "\"{}\";q={};w={}",
            cfg.name.replace(['"', '\\'], ""),
            quota.count,
            quota.period.as_secs()
        ))
        .unwrap_or(http::HeaderValue::from_static("\"limit\""));
        Ok(Rule {
            name: std::sync::Arc::from(cfg.name.as_str()),
            key,
            quota,
            shadow: cfg.shadow,
            exempt_ips,
            exempt_paths: cfg.exempt_paths.clone(),
            store,
            fingerprint,
            policy,
        })
    }

    /// The decision for a request, or `None` when the rule does not apply to it.
    pub fn check(
        &self,
        ip: std::net::IpAddr,
        path: &str,
        route: &str,
        h: &http::HeaderMap,
        now: u64,
    ) -> Option<Decision> {
        if self.exempt_ips.iter().any(|c| c.contains(ip))
            || self.exempt_paths.iter().any(|p| path.starts_with(p.as_str()))
        {
            return None;
        }
        let ip_bytes = |k: &mut Vec<u8>| match ip {
            std::net::IpAddr::V4(a) => k.extend_from_slice(&a.octets()),
            std::net::IpAddr::V6(a) => k.extend_from_slice(&a.octets()),
        };
        let mut key = Vec::with_capacity(32);
        match &self.key {
            KeyKind::Ip => ip_bytes(&mut key),
            KeyKind::IpPath => {
                ip_bytes(&mut key);
                key.push(0);
                key.extend_from_slice(path.as_bytes());
            }
            KeyKind::Route => key.extend_from_slice(route.as_bytes()),
            KeyKind::Header(n) => key.extend_from_slice(h.get(n)?.as_bytes()),
            KeyKind::ApiKey(n) => match h.get(n) {
                Some(v) => {
                    key.push(1);
                    key.extend_from_slice(&sha2::Sha256::digest(v.as_bytes())[..16]);
                }
                None => {
                    key.push(0);
                    ip_bytes(&mut key);
                }
            },
            KeyKind::Cookie(name) => {
                let v = h
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|c| c.trim().split_once('='))
                    .find(|(k, _)| k == name)?
                    .1;
                key.extend_from_slice(v.as_bytes());
            }
        }
        Some(self.store.check(&key, now, &self.quota))
    }
}

use sha2::Digest as _;

#[cfg(test)]
mod rule_tests {
    use super::*;

    fn cfg(key: &str) -> rampart_config::RateLimit {
        rampart_config::RateLimit {
            name: "r".into(),
            key: key.into(),
            rate: "1/s".into(),
            burst: Some(1),
            shadow: false,
            exempt_ips: vec!["10.0.0.0/8".into()],
            exempt_paths: vec!["/healthz".into()],
            max_keys: 100,
        }
    }

    #[test]
    fn keys_and_exemptions() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("cookie", "a=1; session=abc".parse().unwrap());
        h.insert("x-key", "secret".parse().unwrap());
        let allow = |d: Option<Decision>| matches!(d, Some(Decision::Allow { .. }));
        let r = Rule::build(&cfg("ip"), 0, None).unwrap();
        assert!(allow(r.check(ip("192.0.2.1"), "/a", "/", &h, 0)));
        assert!(!allow(r.check(ip("192.0.2.1"), "/b", "/", &h, 0)), "same IP, any path");
        assert!(r.check(ip("10.1.1.1"), "/a", "/", &h, 0).is_none(), "exempt network");
        assert!(
            r.check(ip("192.0.2.1"), "/healthz", "/", &h, 0).is_none(),
            "exempt path"
        );
        let r = Rule::build(&cfg("ip_path"), 0, None).unwrap();
        assert!(allow(r.check(ip("192.0.2.1"), "/a", "/", &h, 0)));
        assert!(
            allow(r.check(ip("192.0.2.1"), "/b", "/", &h, 0)),
            "another path, another key"
        );
        let r = Rule::build(&cfg("cookie:session"), 0, None).unwrap();
        assert!(allow(r.check(ip("192.0.2.1"), "/", "/", &h, 0)));
        assert!(
            !allow(r.check(ip("192.0.2.2"), "/", "/", &h, 0)),
            "same cookie, other IP"
        );
        assert!(r.check(ip("192.0.2.1"), "/", "/", &http::HeaderMap::new(), 0).is_none());
        let r = Rule::build(&cfg("api_key:x-key"), 0, None).unwrap();
        assert!(allow(r.check(ip("192.0.2.1"), "/", "/", &h, 0)));
        assert!(!allow(r.check(ip("192.0.2.9"), "/", "/", &h, 0)), "the key, not the IP");
        assert!(
            allow(r.check(ip("192.0.2.1"), "/", "/", &http::HeaderMap::new(), 0)),
            "no key: by IP"
        );
        // A reload with the same quota keeps the counts; another quota starts afresh.
        let again = Rule::build(&cfg("api_key:x-key"), 0, Some(&r)).unwrap();
        assert!(!allow(again.check(ip("192.0.2.1"), "/", "/", &h, 0)));
        let mut other = cfg("api_key:x-key");
        other.rate = "2/s".into();
        let fresh = Rule::build(&other, 0, Some(&r)).unwrap();
        assert!(allow(fresh.check(ip("192.0.2.1"), "/", "/", &h, 0)));
        assert_eq!(again.policy, "\"r\";q=1;w=1");
    }

    #[test]
    fn config_errors() {
        let mut c = cfg("header:bad name");
        c.rate = "x/s".into();
        c.max_keys = 0;
        let errs = Rule::build(&c, 2, None).err().unwrap();
        let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["rate_limit[2].key", "rate_limit[2].rate", "rate_limit[2].max_keys"]
        );
    }
}
