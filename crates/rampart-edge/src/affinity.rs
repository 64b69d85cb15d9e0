//! Session affinity: keep a client on the backend that served it.
//!
//! - `cookie`: the edge sets a cookie whose value is opaque and signed:
//!   `EXPIRY.BACKEND_ID.MAC`, where BACKEND_ID is derived from the pool and backend URL
//!   by SHA-256 (never an address) and MAC is HMAC-SHA256 over pool, expiry and id. A
//!   forged, tampered or expired cookie is ignored (normal balancing, new cookie).
//! - `header` / `ip`: the header value or client IP is hashed onto a ring of the usable
//!   backends, so the same key keeps the same backend while it is usable.
//!
//! A pinned backend that is disabled, unhealthy or gone is not used: the client is
//! balanced normally and re-pinned. A draining backend keeps its existing sessions
//! (cookie mode) but takes no new ones.

use crate::balance::hash_bytes;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use rampart_config::{Affinity as AffinityConfig, AffinityMode};
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

type HmacSha256 = Hmac<Sha256>;

pub struct Affinity {
    pub mode: AffinityMode,
    cookie: String,
    header: String,
    ttl_secs: u64,
    /// `; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax`
    attributes: String,
    key: Vec<u8>,
    pool: String,
}

/// What the request says about its session.
pub enum Pin {
    /// A valid cookie naming this backend id.
    Cookie(u64),
    /// A key to hash onto the ring.
    Hash(u64),
    /// Nothing usable: balance normally (and set a cookie, in cookie mode).
    None,
}

/// The process-wide random key used when a pool configures none.
fn process_key() -> Vec<u8> {
    static KEY: OnceLock<Vec<u8>> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut k = vec![0u8; 32];
        let provider = rustls::crypto::ring::default_provider();
        if provider.secure_random.fill(&mut k).is_err() {
            // No system randomness: fall back to a time-seeded key (still unguessable
            // enough for affinity, which is not an authentication mechanism).
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            k = Sha256::digest(t.to_le_bytes()).to_vec();
        }
        k
    })
    .clone()
}

/// The opaque id of a backend, stable across restarts and reloads.
pub fn backend_id(pool: &str, url: &str) -> u64 {
    let d = Sha256::digest(format!("{pool}\n{url}").as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

impl Affinity {
    pub fn build(cfg: &AffinityConfig, pool: &str, base_dir: &Path) -> Result<Affinity, String> {
        let key = match &cfg.key {
            Some(spec) => rampart_config::resolve_secret(spec, base_dir)
                .map(|(v, _)| v.into_bytes())
                .map_err(|e| format!("affinity.key: {e}"))?,
            None => process_key(),
        };
        let mut attributes = format!("; Path={}; Max-Age={}", cfg.path, cfg.ttl.get().as_secs());
        if cfg.http_only {
            attributes.push_str("; HttpOnly");
        }
        if cfg.secure {
            attributes.push_str("; Secure");
        }
        attributes.push_str(&format!("; SameSite={}", cfg.same_site));
        Ok(Affinity {
            mode: cfg.mode,
            cookie: cfg.cookie.clone(),
            header: cfg.header.to_ascii_lowercase(),
            ttl_secs: cfg.ttl.get().as_secs().max(1),
            attributes,
            key,
            pool: pool.to_string(),
        })
    }

    fn mac(&self, expiry: u64, id: u64) -> Option<HmacSha256> {
        let mut m = HmacSha256::new_from_slice(&self.key).ok()?;
        m.update(self.pool.as_bytes());
        m.update(b"\n");
        m.update(&expiry.to_be_bytes());
        m.update(&id.to_be_bytes());
        Some(m)
    }

    /// A signed cookie value pinning `id`, valid until `now + ttl`.
    pub fn token(&self, id: u64, now_unix: u64) -> Option<String> {
        let expiry = now_unix + self.ttl_secs;
        let mac = self.mac(expiry, id)?.finalize().into_bytes();
        Some(format!("{expiry:x}.{id:016x}.{}", hex(&mac[..16])))
    }

    /// The backend id a cookie value pins, if it is authentic and not expired.
    pub fn verify(&self, value: &str, now_unix: u64) -> Option<u64> {
        let mut parts = value.split('.');
        let (exp, id, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || mac.len() != 32 {
            return None;
        }
        let expiry = u64::from_str_radix(exp, 16).ok()?;
        let id = u64::from_str_radix(id, 16).ok()?;
        let given = unhex(mac)?;
        // verify_truncated_left compares in constant time.
        self.mac(expiry, id)?.verify_truncated_left(&given).ok()?;
        (expiry > now_unix).then_some(id)
    }

    /// Read the session key of a request.
    pub fn pin(&self, headers: &HeaderMap, client_ip: IpAddr) -> Pin {
        match self.mode {
            AffinityMode::Cookie => crate::headers::cookie(headers, &self.cookie)
                .and_then(|v| self.verify(v, now_unix()))
                .map_or(Pin::None, Pin::Cookie),
            AffinityMode::Header => headers
                .get(self.header.as_str())
                .map_or(Pin::None, |v| Pin::Hash(hash_bytes(v.as_bytes()))),
            AffinityMode::Ip => Pin::Hash(crate::balance::hash_ip(client_ip)),
        }
    }

    /// The `Set-Cookie` value pinning a backend.
    pub fn set_cookie(&self, id: u64) -> Option<http::HeaderValue> {
        let token = self.token(id, now_unix())?;
        http::HeaderValue::from_str(&format!("{}={token}{}", self.cookie, self.attributes)).ok()
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affinity(key: &str) -> Affinity {
        let cfg = AffinityConfig {
            key: Some(key.into()),
            ..AffinityConfig::default()
        };
        Affinity::build(&cfg, "app", Path::new(".")).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn tokens_verify_and_expire() {
        let a = affinity("0123456789abcdef0123");
        let id = backend_id("app", "http://10.0.0.1:80");
        let t = a.token(id, 1000).unwrap_or_default();
        assert_eq!(a.verify(&t, 1000), Some(id));
        assert_eq!(a.verify(&t, 1000 + 3600), None, "expired");
        assert!(!t.contains("10.0.0.1"), "opaque: {t}");
    }

    #[test]
    fn forged_or_tampered_tokens_are_rejected() {
        let a = affinity("0123456789abcdef0123");
        let other = affinity("another-key-entirely-000");
        let id = backend_id("app", "http://10.0.0.1:80");
        let t = a.token(id, 1000).unwrap_or_default();
        assert_eq!(other.verify(&t, 1000), None, "signed with another key");
        // Point the cookie at another backend id, keeping the MAC.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged_id = format!("{:016x}", backend_id("app", "http://10.0.0.2:80"));
        parts[1] = &forged_id;
        assert_eq!(a.verify(&parts.join("."), 1000), None);
        // Extend the expiry, keeping the MAC.
        let later = format!("{:x}", 1_000_000u64);
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[0] = &later;
        assert_eq!(a.verify(&parts.join("."), 1000), None);
        for junk in ["", "a.b.c", "1.2", "zz.zz.zz", &"f".repeat(200)] {
            assert_eq!(a.verify(junk, 0), None);
        }
    }

    #[test]
    fn cookie_attributes() {
        let a = affinity("0123456789abcdef0123");
        let v = a
            .set_cookie(1)
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_default();
        assert!(v.starts_with("rampart_affinity="), "{v}");
        assert!(v.ends_with("; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"), "{v}");
    }
}
