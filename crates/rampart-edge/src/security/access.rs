//! Access lists for sites and routes: client IP allow and deny lists, header deny
//! and require rules, and header stripping. Compiled once per config snapshot.
//!
//! Order: `deny_ips`, then `allow_ips` (when not empty), then `deny_headers`, then
//! `require_headers`; the first failing test refuses the request with 403
//! `ACCESS_DENIED` and names itself in the answer's `detail`. The client IP is the
//! one the pipeline settled on: the socket peer, the PROXY protocol's source, or the
//! right-most untrusted `X-Forwarded-For` hop when the peer is a trusted proxy.

use http::{HeaderMap, HeaderName};
use rampart_config::{Access, Cidr, parse_cidrs};
use regex::bytes::{Regex, RegexBuilder};
use std::net::IpAddr;

/// Compiled size limit of one header regex (the engine is linear-time; this bounds
/// its memory).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

struct HeaderTest {
    name: HeaderName,
    pattern: Option<Regex>,
    /// `header-denied:NAME` / `header-required:NAME`, made once.
    detail: String,
}

impl HeaderTest {
    fn matches(&self, h: &HeaderMap) -> bool {
        let mut values = h.get_all(&self.name).iter().peekable();
        match &self.pattern {
            None => values.peek().is_some(),
            Some(re) => values.any(|v| re.is_match(v.as_bytes())),
        }
    }
}

pub struct AccessList {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    deny_headers: Vec<HeaderTest>,
    require_headers: Vec<HeaderTest>,
    strip: Vec<HeaderName>,
}

/// Compile a regex for matching request data: linear time, bounded size.
pub fn compile_regex(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => {
                format!("regex is too large once compiled (limit {limit} bytes)")
            }
            other => format!("invalid regex: {other}"),
        })
}

impl AccessList {
    /// Compile `a`; errors come with their field path below `at`.
    pub fn build(a: &Access, at: &str) -> Result<AccessList, Vec<(String, String)>> {
        let mut errs = Vec::new();
        let (allow, bad) = parse_cidrs(&a.allow_ips, &format!("{at}.allow_ips"));
        errs.extend(bad);
        let (deny, bad) = parse_cidrs(&a.deny_ips, &format!("{at}.deny_ips"));
        errs.extend(bad);
        let mut tests = |list: &[rampart_config::HeaderRule], field: &str, verb: &str| -> Vec<HeaderTest> {
            let mut out = Vec::new();
            for (i, r) in list.iter().enumerate() {
                let name = match HeaderName::from_bytes(r.name.as_bytes()) {
                    Ok(n) => n,
                    Err(_) => {
                        errs.push((
                            format!("{at}.{field}[{i}].name"),
                            format!("`{}` is not a header name", r.name),
                        ));
                        continue;
                    }
                };
                let pattern = match r.matches.as_deref().map(compile_regex) {
                    None => None,
                    Some(Ok(re)) => Some(re),
                    Some(Err(e)) => {
                        errs.push((format!("{at}.{field}[{i}].matches"), e));
                        continue;
                    }
                };
                out.push(HeaderTest {
                    detail: format!("{verb}:{name}"),
                    name,
                    pattern,
                });
            }
            out
        };
        let deny_headers = tests(&a.deny_headers, "deny_headers", "header-denied");
        let require_headers = tests(&a.require_headers, "require_headers", "header-required");
        let mut strip = Vec::new();
        for (i, n) in a.strip_headers.iter().enumerate() {
            match HeaderName::from_bytes(n.as_bytes()) {
                Ok(n) => strip.push(n),
                Err(_) => errs.push((
                    format!("{at}.strip_headers[{i}]"),
                    format!("`{n}` is not a header name"),
                )),
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(AccessList {
            allow,
            deny,
            deny_headers,
            require_headers,
            strip,
        })
    }

    /// `Err(detail)` when the request is refused.
    pub fn check(&self, ip: IpAddr, h: &HeaderMap) -> Result<(), &str> {
        if self.deny.iter().any(|c| c.contains(ip)) {
            return Err("ip-denied");
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(ip)) {
            return Err("ip-not-allowed");
        }
        if let Some(t) = self.deny_headers.iter().find(|t| t.matches(h)) {
            return Err(&t.detail);
        }
        if let Some(t) = self.require_headers.iter().find(|t| !t.matches(h)) {
            return Err(&t.detail);
        }
        Ok(())
    }

    /// Remove the configured headers.
    pub fn strip(&self, h: &mut HeaderMap) {
        for n in &self.strip {
            h.remove(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_config::HeaderRule;

    fn rule(name: &str, matches: Option<&str>) -> HeaderRule {
        HeaderRule {
            name: name.into(),
            matches: matches.map(str::to_string),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ips_then_headers() {
        let a = Access {
            allow_ips: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            deny_ips: vec!["10.6.6.6".into()],
            deny_headers: vec![rule("user-agent", Some("(?i)sqlmap|nikto"))],
            require_headers: vec![rule("x-api-key", None)],
            strip_headers: vec!["x-internal".into()],
        };
        let acl = AccessList::build(&a, "site[0].access").unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k".parse().unwrap());
        assert_eq!(acl.check(ip("10.1.2.3"), &h), Ok(()));
        assert_eq!(acl.check(ip("2001:db8::7"), &h), Ok(()));
        assert_eq!(acl.check(ip("10.6.6.6"), &h), Err("ip-denied"));
        assert_eq!(acl.check(ip("192.0.2.1"), &h), Err("ip-not-allowed"));
        h.insert("user-agent", "SQLMap/1.7".parse().unwrap());
        assert_eq!(acl.check(ip("10.1.2.3"), &h), Err("header-denied:user-agent"));
        let mut h = HeaderMap::new();
        assert_eq!(acl.check(ip("10.1.2.3"), &h), Err("header-required:x-api-key"));
        h.insert("x-internal", "1".parse().unwrap());
        acl.strip(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let a = Access {
            allow_ips: vec!["10.0.0.0/33".into()],
            deny_headers: vec![rule("bad name", None), rule("x", Some("(unclosed"))],
            ..Access::default()
        };
        let errs = AccessList::build(&a, "site[1].access").err().unwrap();
        let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "site[1].access.allow_ips[0]",
                "site[1].access.deny_headers[0].name",
                "site[1].access.deny_headers[1].matches"
            ]
        );
        // A regex too large to compile within the limit is a config error too.
        assert!(compile_regex("(\\w{100}){100}").unwrap_err().contains("too large"));
    }
}
