//! Routing: host → site (exact, `*.suffix` wildcard, default site), then
//! path → route (exact, then glob in declaration order, then longest prefix).

use std::collections::HashMap;

/// Site and route tables, generic over what a route resolves to.
pub struct Router<R> {
    exact_hosts: HashMap<String, usize>,
    /// `(".example.test", site)`, longest suffix first.
    wildcard_hosts: Vec<(String, usize)>,
    default_site: Option<usize>,
    pub sites: Vec<SiteTable<R>>,
}

pub struct SiteTable<R> {
    exact: HashMap<String, usize>,
    globs: Vec<(Glob, usize)>,
    /// Longest prefix first.
    prefixes: Vec<(String, usize)>,
    pub routes: Vec<R>,
}

/// How a route matched, so the prefix can be stripped or rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matched<'a> {
    Exact,
    Glob,
    Prefix(&'a str),
}

/// How a route's path is written in the config.
pub enum PathMatch {
    Exact(String),
    Glob(String),
    Prefix(String),
}

impl<R> Router<R> {
    pub fn new() -> Self {
        Router {
            exact_hosts: HashMap::new(),
            wildcard_hosts: Vec::new(),
            default_site: None,
            sites: Vec::new(),
        }
    }

    /// Add a site; host patterns must already be normalised (lower case, no trailing dot).
    pub fn add_site(&mut self, hosts: &[String], default: bool, routes: Vec<(PathMatch, R)>) -> usize {
        let idx = self.sites.len();
        for h in hosts {
            if let Some(suffix) = h.strip_prefix('*') {
                self.wildcard_hosts.push((suffix.to_string(), idx));
            } else {
                self.exact_hosts.insert(h.clone(), idx);
            }
        }
        self.wildcard_hosts.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        if default {
            self.default_site = Some(idx);
        }
        let mut table = SiteTable {
            exact: HashMap::new(),
            globs: Vec::new(),
            prefixes: Vec::new(),
            routes: Vec::with_capacity(routes.len()),
        };
        for (i, (m, r)) in routes.into_iter().enumerate() {
            match m {
                PathMatch::Exact(p) => {
                    table.exact.insert(p, i);
                }
                PathMatch::Glob(g) => table.globs.push((Glob::new(&g), i)),
                PathMatch::Prefix(p) => table.prefixes.push((p, i)),
            }
            table.routes.push(r);
        }
        table.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        self.sites.push(table);
        idx
    }

    /// Find the site for a request host (any case, with or without port).
    pub fn site(&self, host: &str) -> Option<usize> {
        if self.exact_hosts.is_empty() && self.wildcard_hosts.is_empty() {
            return self.default_site;
        }
        let name = strip_port(host).trim_end_matches('.');
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(i) = self.exact_hosts.get(name) {
            return Some(*i);
        }
        for (suffix, i) in &self.wildcard_hosts {
            // `*.example.test` matches `a.example.test` and `a.b.example.test`, not `example.test`.
            if name.len() > suffix.len() && name.ends_with(suffix.as_str()) {
                return Some(*i);
            }
        }
        self.default_site
    }
}

impl<R> Default for Router<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> SiteTable<R> {
    pub fn route(&self, path: &str) -> Option<(&R, Matched<'_>)> {
        if let Some(i) = self.exact.get(path) {
            return Some((&self.routes[*i], Matched::Exact));
        }
        for (g, i) in &self.globs {
            if g.matches(path) {
                return Some((&self.routes[*i], Matched::Glob));
            }
        }
        for (p, i) in &self.prefixes {
            if path.starts_with(p.as_str()) {
                return Some((&self.routes[*i], Matched::Prefix(p)));
            }
        }
        None
    }
}

/// Strip a `:port` from a host, leaving IPv6 literals in brackets intact.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    // A `:` with only digits after it, found from the end: a byte loop, since the
    // generic reverse search cost more than the rest of the site lookup.
    let bytes = host.as_bytes();
    let mut i = bytes.len();
    while i > 0 && bytes[i - 1].is_ascii_digit() {
        i -= 1;
    }
    match i.checked_sub(1) {
        Some(colon) if bytes[colon] == b':' => &host[..colon],
        _ => host,
    }
}

/// Path glob: `*` matches within one segment, `**` across segments, `?` one character.
/// Matching is dynamic programming over (pattern, path), so it is linear in their product
/// and cannot backtrack catastrophically.
#[derive(Debug, Clone)]
pub struct Glob {
    tokens: Vec<Tok>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Lit(u8),
    Any,   // ?
    Star,  // *
    DStar, // **
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        let b = pattern.as_bytes();
        let mut tokens = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'*' if b.get(i + 1) == Some(&b'*') => {
                    tokens.push(Tok::DStar);
                    i += 2;
                    continue;
                }
                b'*' => tokens.push(Tok::Star),
                b'?' => tokens.push(Tok::Any),
                c => tokens.push(Tok::Lit(c)),
            }
            i += 1;
        }
        Glob { tokens }
    }

    pub fn matches(&self, path: &str) -> bool {
        let s = path.as_bytes();
        // reach[j]: pattern prefix consumed so far can match s[..j].
        let mut reach = vec![false; s.len() + 1];
        reach[0] = true;
        for t in &self.tokens {
            let mut next = vec![false; s.len() + 1];
            match t {
                Tok::Lit(c) => {
                    for j in 0..s.len() {
                        if reach[j] && s[j] == *c {
                            next[j + 1] = true;
                        }
                    }
                }
                Tok::Any => {
                    for j in 0..s.len() {
                        if reach[j] && s[j] != b'/' {
                            next[j + 1] = true;
                        }
                    }
                }
                Tok::Star | Tok::DStar => {
                    let cross = *t == Tok::DStar;
                    let mut on = false;
                    for j in 0..=s.len() {
                        if reach[j] {
                            on = true;
                        }
                        next[j] = on;
                        if j < s.len() && s[j] == b'/' && !cross {
                            on = false;
                        }
                    }
                }
            }
            reach = next;
        }
        reach[s.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<&'static str> {
        let mut r = Router::new();
        r.add_site(
            &["example.test".into(), "*.example.test".into()],
            false,
            vec![
                (PathMatch::Prefix("/".into()), "root"),
                (PathMatch::Prefix("/api/".into()), "api"),
                (PathMatch::Prefix("/api/v2/".into()), "api2"),
                (PathMatch::Exact("/api/health".into()), "health"),
                (PathMatch::Glob("/img/*.png".into()), "png"),
                (PathMatch::Glob("/static/**".into()), "static"),
            ],
        );
        r.add_site(
            &["*.deep.example.test".into()],
            false,
            vec![(PathMatch::Prefix("/".into()), "deep")],
        );
        r.add_site(&[], true, vec![(PathMatch::Prefix("/".into()), "fallback")]);
        r
    }

    fn resolve(r: &Router<&'static str>, host: &str, path: &str) -> Option<&'static str> {
        let s = r.site(host)?;
        r.sites[s].route(path).map(|(r, _)| *r)
    }

    #[test]
    fn hosts() {
        let r = router();
        assert_eq!(r.site("example.test"), Some(0));
        assert_eq!(r.site("EXAMPLE.test:8080"), Some(0));
        assert_eq!(r.site("www.example.test."), Some(0));
        assert_eq!(r.site("a.b.example.test"), Some(0));
        assert_eq!(r.site("x.deep.example.test"), Some(1), "longest wildcard wins");
        assert_eq!(r.site("other.test"), Some(2), "default site");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    /// The byte loop strips what the plain reading does: the last `:` when only
    /// digits follow it.
    #[test]
    fn ports_are_stripped_as_rfind_would() {
        let by_rfind = |h: &'static str| match h.rfind(':') {
            Some(i) if h[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &h[..i],
            _ => h,
        };
        let hosts = [
            "127.0.0.1:19001",
            "a.test:80",
            "a.test:",
            "a.test",
            "1234",
            "a:b1",
            "a:1:2",
            ":80",
            ":",
            "",
            "é.test:443",
            "a.test:8o",
        ];
        for h in hosts {
            assert_eq!(strip_port(h), by_rfind(h), "{h:?}");
        }
    }

    #[test]
    fn a_router_with_only_a_default_site_gives_it_for_any_host() {
        let mut r: Router<&'static str> = Router::new();
        r.add_site(&[], true, vec![(PathMatch::Prefix("/".into()), "fallback")]);
        for host in ["a.test", "A.TEST:80", "", "[::1]:8080"] {
            assert_eq!(r.site(host), Some(0), "{host:?}");
        }
        assert_eq!(Router::<&'static str>::new().site("a.test"), None);
    }

    #[test]
    fn paths() {
        let r = router();
        assert_eq!(resolve(&r, "example.test", "/"), Some("root"));
        assert_eq!(resolve(&r, "example.test", "/api/users"), Some("api"));
        assert_eq!(resolve(&r, "example.test", "/api/v2/users"), Some("api2"));
        assert_eq!(resolve(&r, "example.test", "/api/health"), Some("health"));
        assert_eq!(resolve(&r, "example.test", "/api/healthz"), Some("api"));
        assert_eq!(resolve(&r, "example.test", "/img/a.png"), Some("png"));
        assert_eq!(resolve(&r, "example.test", "/img/a/b.png"), Some("root"));
        assert_eq!(resolve(&r, "example.test", "/static/a/b/c.js"), Some("static"));
        let s = r.site("example.test").unwrap_or(0);
        assert_eq!(r.sites[s].route("/api/x").map(|x| x.1), Some(Matched::Prefix("/api/")));
    }

    #[test]
    fn globs() {
        assert!(Glob::new("/a/*/c").matches("/a/b/c"));
        assert!(!Glob::new("/a/*/c").matches("/a/b/x/c"));
        assert!(Glob::new("/a/**/c").matches("/a/b/x/c"));
        assert!(Glob::new("/a/**").matches("/a/"));
        assert!(Glob::new("/f?o").matches("/foo"));
        assert!(!Glob::new("/f?o").matches("/f/o"));
        assert!(Glob::new("*").matches(""));
        // Pathological pattern stays fast (DP, no backtracking).
        let p = "/".to_string() + &"**a".repeat(30) + "b";
        let s = "/".to_string() + &"a".repeat(4000);
        assert!(!Glob::new(&p).matches(&s));
    }
}
