//! Rampart configuration: parsing TOML into the schema in [`model`],
//! validating the whole of it, and reporting every problem with the path of
//! the field that has it (`site[0].route[2].pool: no pool named "ap"`).

pub mod model;
pub mod net;
pub mod units;

pub use model::*;
pub use net::{Cidr, parse_cidrs};
pub use units::{Duration, Size};

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One problem with a configuration, at a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl ConfigErrors {
    /// Add errors that come as (path, message) pairs.
    pub fn extend(&mut self, list: impl IntoIterator<Item = (String, String)>) {
        for (path, message) in list {
            self.push(path, message);
        }
    }
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn messages(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
    pub fn into_result<T>(self, ok: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() { Ok(ok) } else { Err(self) }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A configuration that parsed and validated, with its secrets resolved.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    /// The admin bearer token (`admin.token`), resolved from `env:`, `file:` or a literal.
    pub admin_token: Option<String>,
    /// Every admin token: (name, secret, scope); `admin.token` is `admin`, write.
    pub admin_tokens: Vec<(String, String, TokenScope)>,
    /// `admin.metrics_allow`, parsed.
    pub metrics_allow: Vec<Cidr>,
    /// `cache.purge_allow`, parsed.
    pub purge_allow: Vec<Cidr>,
    pub trusted_proxies: Vec<Cidr>,
    /// Problems that do not stop the config from loading.
    pub warnings: Vec<String>,
    /// A stable hash of the source text, shown by the admin API.
    pub hash: String,
    /// Directory relative paths in the config are resolved against.
    pub base_dir: PathBuf,
}

impl Validated {
    /// Resolve a path from the config against the config file's directory.
    pub fn resolve_path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// A one-line summary for `rampart check`.
    pub fn summary(&self) -> String {
        let c = &self.config;
        let routes: usize = c.site.iter().map(|s| s.route.len()).sum();
        let backends: usize = c.pool.iter().map(|p| p.backends.len()).sum();
        let tls = c.server.tls.as_ref().map_or(0, |t| t.listen.len());
        format!(
            "config ok: {} listener(s) ({} plain, {} tls), {} site(s), {} route(s), {} pool(s), {} backend(s), hash {}",
            c.server.listen.len() + tls,
            c.server.listen.len(),
            tls,
            c.site.len(),
            routes,
            c.pool.len(),
            backends,
            self.hash
        )
    }
}

/// Read, parse and validate a configuration file.
pub fn load_file(path: &Path) -> Result<Validated, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![FieldError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )])
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    load_str(&text, &base)
}

/// Parse and validate configuration text; relative paths resolve against `base_dir`.
pub fn load_str(text: &str, base_dir: &Path) -> Result<Validated, ConfigErrors> {
    let config = parse(text)?;
    validate(config, text, base_dir)
}

/// Parse TOML text into the schema. Syntax errors carry line and column;
/// schema errors carry the field path.
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let msg = e.message().to_string();
        let at = e
            .span()
            .map(|s| line_col(text, s.start))
            .map(|(l, c)| format!("TOML syntax error at line {l}, column {c}: {msg}"))
            .unwrap_or_else(|| format!("TOML syntax error: {msg}"));
        ConfigErrors(vec![FieldError::new("", at)])
    })?;
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.into_inner().message().to_string();
        ConfigErrors(vec![schema_error(path, &inner)])
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |i| before.len() - i - 1) + 1;
    (line, col)
}

/// Turn serde's message into ours, suggesting the closest known field for an unknown one.
fn schema_error(path: String, msg: &str) -> FieldError {
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let words: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
        if let Some((unknown, known)) = words.split_first() {
            // serde_path_to_error already ends the path with the unknown key.
            let path = if path.is_empty() || !path.ends_with(unknown) {
                [path.as_str(), unknown]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(".")
            } else {
                path
            };
            let hint = suggest(unknown, known.iter().copied())
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_else(|| {
                    if known.is_empty() {
                        String::new()
                    } else {
                        format!(" (known fields: {})", known.join(", "))
                    }
                });
            return FieldError::new(path, format!("unknown field{hint}"));
        }
    }
    FieldError::new(path, msg.to_string())
}

/// The candidate closest to `word` by edit distance, if close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn stable_hash(text: &str) -> String {
    // FNV-1a, 64 bit: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Resolve a secret reference: `env:NAME`, `file:PATH`, or a literal.
/// Returns the value and whether it was a literal.
pub fn resolve_secret(spec: &str, base: &Path) -> Result<(String, bool), String> {
    if let Some(name) = spec.strip_prefix("env:") {
        match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => Ok((v.trim().to_string(), false)),
            Ok(_) => Err(format!("environment variable {name} is empty")),
            Err(_) => Err(format!("environment variable {name} is not set")),
        }
    } else if let Some(p) = spec.strip_prefix("file:") {
        let path = if Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            base.join(p)
        };
        match std::fs::read_to_string(&path) {
            Ok(v) if !v.trim().is_empty() => Ok((v.trim().to_string(), false)),
            Ok(_) => Err(format!("{} is empty", path.display())),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    } else if spec.trim().is_empty() {
        Err("token is empty".into())
    } else {
        Ok((spec.to_string(), true))
    }
}

/// Check a parsed configuration as a whole, collecting every problem.
pub fn validate(config: Config, text: &str, base_dir: &Path) -> Result<Validated, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut warnings = Vec::new();
    let s = &config.server;

    let mut addrs = HashSet::new();
    for (i, l) in s.listen.iter().enumerate() {
        check_listen(&mut errs, &mut addrs, &format!("server.listen[{i}]"), l);
    }
    if let Some(tls) = &s.tls {
        if tls.listen.is_empty() {
            errs.push("server.tls.listen", "at least one TLS listener is required");
        }
        for (i, l) in tls.listen.iter().enumerate() {
            check_listen(&mut errs, &mut addrs, &format!("server.tls.listen[{i}]"), l);
        }
        if tls.certificates.is_empty() {
            errs.push("server.tls.certificates", "at least one certificate is required");
        }
        for (i, c) in tls.certificates.iter().enumerate() {
            for (field, p) in [("cert", &c.cert), ("key", &c.key)] {
                let full = resolve(base_dir, p);
                if !full.is_file() {
                    errs.push(
                        format!("server.tls.certificates[{i}].{field}"),
                        format!("no such file: {}", full.display()),
                    );
                }
            }
        }
    }
    if s.listen.is_empty() && s.tls.is_none() {
        errs.push("server.listen", "no listeners: add a plain or TLS listener");
    }
    if let Some(w) = s.workers
        && !(1..=1024).contains(&w)
    {
        errs.push("server.workers", "must be between 1 and 1024");
    }
    if s.runtime == RuntimeModel::CurrentThread && s.workers.is_some_and(|w| w != 1) {
        errs.push(
            "server.runtime",
            "\"current_thread\" runs one worker; set workers = 1 or use \"multi_thread\"",
        );
    }
    if let Some(d) = &s.data_dir {
        let p = resolve(base_dir, d);
        if p.exists() && !p.is_dir() {
            errs.push("server.data_dir", format!("{} is not a directory", p.display()));
        }
    }
    if s.max_connections == 0 {
        errs.push("server.max_connections", "must be at least 1");
    }
    let (trusted, bad) = parse_cidrs(&s.trusted_proxies, "server.trusted_proxies");
    errs.extend(bad);
    for (i, l) in s.proxy_protocol.iter().enumerate() {
        let known = s.listen.contains(l) || s.tls.as_ref().is_some_and(|t| t.listen.contains(l));
        if !known {
            errs.push(
                format!("server.proxy_protocol[{i}]"),
                format!("\"{l}\" is not one of server.listen or server.tls.listen"),
            );
        }
    }
    if !s.proxy_protocol.is_empty() && s.trusted_proxies.is_empty() {
        errs.push(
            "server.proxy_protocol",
            "only trusted proxies may send a PROXY header: set server.trusted_proxies",
        );
    }
    if s.header_read_timeout.is_zero() {
        errs.push("server.header_read_timeout", "must be greater than zero");
    }
    if s.client_body_timeout.is_zero() {
        errs.push("server.client_body_timeout", "must be greater than zero");
    }
    let l = &s.limits;
    if l.max_header_size.bytes() < 1024 || l.max_header_size.bytes() > 1 << 20 {
        errs.push("server.limits.max_header_size", "must be between 1KiB and 1MiB");
    }
    if l.max_uri_length.bytes() < 256 || l.max_uri_length.bytes() > 64 * 1024 {
        errs.push("server.limits.max_uri_length", "must be between 256B and 64KiB");
    }
    if l.max_request_body.bytes() == 0 {
        errs.push("server.limits.max_request_body", "must be at least 1 byte");
    }
    if !(1..=1000).contains(&l.max_headers) {
        errs.push("server.limits.max_headers", "must be between 1 and 1000");
    }

    let mut admin_token = None;
    let mut admin_tokens = Vec::new();
    let mut metrics_allow = Vec::new();
    if let Some(a) = &config.admin {
        check_listen(&mut errs, &mut addrs, "admin.listen", &a.listen);
        if let Some(spec) = &a.token {
            match resolve_secret(spec, base_dir) {
                Ok((tok, literal)) => {
                    if literal {
                        warnings.push(
                            "admin.token: a literal token is in the config file; prefer env:NAME or file:PATH".into(),
                        );
                    }
                    admin_token = Some(tok);
                }
                Err(e) => errs.push("admin.token", e),
            }
        }
        if let Some(t) = &admin_token {
            admin_tokens.push(("admin".to_string(), t.clone(), TokenScope::Write));
        }
        for (i, t) in a.tokens.iter().enumerate() {
            if t.name.trim().is_empty() {
                errs.push(format!("admin.tokens[{i}].name"), "must not be empty");
            } else if admin_tokens.iter().any(|(n, _, _)| *n == t.name) {
                errs.push(
                    format!("admin.tokens[{i}].name"),
                    format!("\"{}\" is used twice", t.name),
                );
            }
            match resolve_secret(&t.token, base_dir) {
                Ok((tok, literal)) => {
                    if literal {
                        warnings.push(format!(
                            "admin.tokens[{i}].token: a literal token is in the config file; prefer env:NAME or file:PATH"
                        ));
                    }
                    if admin_tokens.iter().any(|(_, s, _)| *s == tok) {
                        errs.push(format!("admin.tokens[{i}].token"), "the same secret as another token");
                    }
                    admin_tokens.push((t.name.clone(), tok, t.scope));
                }
                Err(e) => errs.push(format!("admin.tokens[{i}].token"), e),
            }
        }
        let (nets, bad) = parse_cidrs(&a.metrics_allow, "admin.metrics_allow");
        metrics_allow = nets;
        errs.extend(bad);
        if a.max_auth_failures == 0 {
            errs.push("admin.max_auth_failures", "must be at least 1");
        }
        if a.auth_lockout.is_zero() {
            errs.push("admin.auth_lockout", "must be greater than zero");
        }
    }

    let cs = &config.cache;
    if cs.memory_size.bytes() < 1 << 20 {
        errs.push("cache.memory_size", "must be at least 1MiB");
    }
    if cs.max_object_size.bytes() == 0 || cs.max_object_size > cs.memory_size {
        errs.push(
            "cache.max_object_size",
            "must be at least 1 byte and at most cache.memory_size",
        );
    }
    if let Some(d) = &cs.disk_dir {
        let p = resolve(base_dir, d);
        if p.exists() && !p.is_dir() {
            errs.push("cache.disk_dir", format!("{} is not a directory", p.display()));
        }
        if cs.disk_size.bytes() < 1 << 20 {
            errs.push("cache.disk_size", "must be at least 1MiB");
        }
    }
    let (purge_allow, bad) = parse_cidrs(&cs.purge_allow, "cache.purge_allow");
    errs.extend(bad);
    if http::HeaderName::from_bytes(cs.tag_header.as_bytes()).is_err() {
        errs.push(
            "cache.tag_header",
            format!("`{}` is not a valid header name", cs.tag_header),
        );
    }
    let acc = &config.log.access;
    if acc.is_empty() {
        errs.push("log.access", "use \"stdout\", \"off\" or a file path");
    } else if acc != "stdout" && acc != "off" {
        let p = resolve(base_dir, acc);
        if let Some(dir) = p.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            errs.push("log.access", format!("directory {} does not exist", dir.display()));
        }
    }

    let mut pools: HashMap<&str, usize> = HashMap::new();
    for (i, p) in config.pool.iter().enumerate() {
        let at = format!("pool[{i}]");
        if p.name.trim().is_empty() {
            errs.push(format!("{at}.name"), "must not be empty");
        } else if let Some(prev) = pools.insert(p.name.as_str(), i) {
            errs.push(
                format!("{at}.name"),
                format!("duplicate pool name \"{}\" (also pool[{prev}])", p.name),
            );
        }
        if p.backends.is_empty() {
            errs.push(format!("{at}.backends"), "a pool needs at least one backend");
        }
        for (j, b) in p.backends.iter().enumerate() {
            let bat = format!("{at}.backends[{j}]");
            if let Err(e) = check_backend_url(&b.url) {
                errs.push(format!("{bat}.url"), e);
            }
            if !(1..=1000).contains(&b.weight) {
                errs.push(format!("{bat}.weight"), "must be between 1 and 1000");
            }
        }
        for (field, d) in [
            ("connect", p.timeouts.connect),
            ("response_header", p.timeouts.response_header),
            ("body_idle", p.timeouts.body_idle),
        ] {
            if d.is_zero() {
                errs.push(format!("{at}.timeouts.{field}"), "must be greater than zero");
            }
        }
        if let Some(ca) = &p.tls.ca {
            let full = resolve(base_dir, ca);
            if !full.is_file() {
                errs.push(format!("{at}.tls.ca"), format!("no such file: {}", full.display()));
            }
        }
        if p.tls.insecure {
            warnings.push(format!(
                "{at}.tls.insecure: certificates of pool \"{}\" are not verified",
                p.name
            ));
        }
        match (&p.hash_key, p.balance) {
            (Some(k), _) => {
                if let Err(e) = k.parse::<HashKey>() {
                    errs.push(format!("{at}.hash_key"), e);
                } else if p.balance != Balance::ConsistentHash {
                    errs.push(
                        format!("{at}.hash_key"),
                        "applies only to balance = \"consistent_hash\"",
                    );
                }
            }
            (None, Balance::ConsistentHash) => errs.push(
                format!("{at}.hash_key"),
                "consistent_hash needs a key: \"ip\", \"path\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\"",
            ),
            (None, _) => {}
        }
        if !(0.0..=1.0).contains(&p.panic_threshold) {
            errs.push(format!("{at}.panic_threshold"), "must be between 0.0 and 1.0");
        }
        if let Some(h) = &p.health {
            let hat = format!("{at}.health");
            if h.kind == HealthKind::Http && !(h.path == "auto" || h.path.starts_with('/')) {
                errs.push(format!("{hat}.path"), "must start with `/`, or be \"auto\"");
            }
            if http::Method::from_bytes(h.method.as_bytes()).is_err() {
                errs.push(format!("{hat}.method"), format!("`{}` is not an HTTP method", h.method));
            }
            if !valid_status_spec(&h.expect) {
                errs.push(
                    format!("{hat}.expect"),
                    "use status codes and ranges, e.g. \"200-399\" or \"200,204\"",
                );
            }
            if h.interval.is_zero() || h.timeout.is_zero() {
                errs.push(hat.clone(), "interval and timeout must be greater than zero");
            }
            if h.consecutive_up == 0 || h.consecutive_down == 0 {
                errs.push(hat.clone(), "consecutive_up and consecutive_down must be at least 1");
            }
            if let Some(host) = &h.host
                && http::HeaderValue::from_str(host).is_err()
            {
                errs.push(format!("{hat}.host"), "is not a valid header value");
            }
        }
        let o = &p.outlier;
        if let Some(r) = o.error_rate
            && !(r > 0.0 && r <= 1.0)
        {
            errs.push(
                format!("{at}.outlier.error_rate"),
                "must be greater than 0.0 and at most 1.0",
            );
        }
        if o.max_ejected_percent > 100 {
            errs.push(format!("{at}.outlier.max_ejected_percent"), "must be between 0 and 100");
        }
        if o.ejection_time.is_zero() || o.max_ejection_time < o.ejection_time || o.window.is_zero() {
            errs.push(
                format!("{at}.outlier"),
                "window and ejection_time must be greater than zero, and max_ejection_time at least ejection_time",
            );
        }
        if o.success_threshold == 0 || o.half_open_requests == 0 {
            errs.push(
                format!("{at}.outlier"),
                "success_threshold and half_open_requests must be at least 1",
            );
        }
        if let Some(a) = &p.affinity {
            let aat = format!("{at}.affinity");
            if a.mode == AffinityMode::Cookie
                && (a.cookie.is_empty()
                    || !a
                        .cookie
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)))
            {
                errs.push(format!("{aat}.cookie"), "use letters, digits, `_`, `-` and `.`");
            }
            if a.mode == AffinityMode::Header && http::HeaderName::from_bytes(a.header.as_bytes()).is_err() {
                errs.push(
                    format!("{aat}.header"),
                    format!("`{}` is not a valid header name", a.header),
                );
            }
            if !matches!(a.same_site.as_str(), "Lax" | "Strict" | "None") {
                errs.push(format!("{aat}.same_site"), "use \"Lax\", \"Strict\" or \"None\"");
            }
            if a.same_site == "None" && !a.secure {
                errs.push(
                    format!("{aat}.secure"),
                    "SameSite=None cookies must be Secure (browsers drop them otherwise)",
                );
            }
            if a.ttl.is_zero() {
                errs.push(format!("{aat}.ttl"), "must be greater than zero");
            }
            if !a.path.starts_with('/') || http::HeaderValue::from_str(&a.path).is_err() || a.path.contains(';') {
                errs.push(format!("{aat}.path"), "must be a path starting with `/`");
            }
            if let Some(k) = &a.key {
                match resolve_secret(k, base_dir) {
                    Ok((v, literal)) => {
                        if v.len() < 16 {
                            errs.push(format!("{aat}.key"), "must be at least 16 bytes");
                        }
                        if literal {
                            warnings.push(format!(
                                "{aat}.key: a literal key is in the config file; prefer env:NAME or file:PATH"
                            ));
                        }
                    }
                    Err(e) => errs.push(format!("{aat}.key"), e),
                }
            }
        }
        let r = &p.retry;
        if r.retries > 10 {
            errs.push(format!("{at}.retry.retries"), "must be at most 10");
        }
        for (k, cond) in r.on.iter().enumerate() {
            let known = matches!(cond.as_str(), "connect_failure" | "reset" | "timeout")
                || cond
                    .parse::<u16>()
                    .is_ok_and(|c| (500..=599).contains(&c) || c == 429 || c == 408);
            if !known {
                errs.push(
                    format!("{at}.retry.on[{k}]"),
                    format!(
                        "`{cond}`: use connect_failure, reset, timeout, or a status such as \"503\" (5xx, 408 or 429)"
                    ),
                );
            }
        }
        if r.per_try_timeout.is_some_and(|d| d.is_zero()) {
            errs.push(format!("{at}.retry.per_try_timeout"), "must be greater than zero");
        }
        if r.budget_percent > 100 {
            errs.push(format!("{at}.retry.budget_percent"), "must be between 0 and 100");
        }
        if r.replay_limit.bytes() > 16 << 20 {
            errs.push(format!("{at}.retry.replay_limit"), "must be at most 16MiB");
        }
        let mut seen_urls = HashSet::new();
        for (j, b) in p.backends.iter().enumerate() {
            if !seen_urls.insert(b.url.trim_end_matches('/')) {
                errs.push(
                    format!("{at}.backends[{j}].url"),
                    format!("`{}` is listed twice", b.url),
                );
            }
        }
        if p.max_idle_per_backend > 10_000 {
            errs.push(format!("{at}.max_idle_per_backend"), "must be at most 10000");
        }
    }

    for (i, p) in config.pool.iter().enumerate() {
        if let Some(f) = &p.fallback {
            match config.pool.iter().find(|q| &q.name == f) {
                None => {
                    let hint = suggest(f, pools.keys().copied())
                        .map(|s| format!(" (did you mean \"{s}\"?)"))
                        .unwrap_or_default();
                    errs.push(format!("pool[{i}].fallback"), format!("no pool named \"{f}\"{hint}"));
                }
                Some(q) if q.name == p.name => {
                    errs.push(format!("pool[{i}].fallback"), "a pool cannot fall back to itself")
                }
                Some(q) if q.fallback.is_some() => errs.push(
                    format!("pool[{i}].fallback"),
                    format!("pool \"{}\" has a fallback of its own; fallbacks do not chain", q.name),
                ),
                Some(_) => {}
            }
        }
    }

    let mut chains: HashSet<&str> = HashSet::new();
    for (i, c) in config.chain.iter().enumerate() {
        let at = format!("chain[{i}]");
        if c.name.trim().is_empty() {
            errs.push(format!("{at}.name"), "must not be empty");
        } else if !chains.insert(c.name.as_str()) {
            errs.push(format!("{at}.name"), format!("duplicate chain name \"{}\"", c.name));
        }
        if c.providers.is_empty() {
            errs.push(format!("{at}.providers"), "a chain needs at least one provider");
        }
        let mut names = HashSet::new();
        for (j, p) in c.providers.iter().enumerate() {
            let pat = format!("{at}.providers[{j}]");
            if p.name.is_empty() || !p.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
                errs.push(format!("{pat}.name"), "use letters, digits, `_`, `-` and `.`");
            } else if !names.insert(p.name.as_str()) {
                errs.push(format!("{pat}.name"), format!("duplicate provider \"{}\"", p.name));
            }
            if let Err(e) = check_provider_url(&p.url) {
                errs.push(format!("{pat}.url"), e);
            }
            if p.timeout.is_some_and(|t| t.is_zero()) {
                errs.push(format!("{pat}.timeout"), "must be greater than zero");
            }
        }
        for (k, st) in c.fail_on_status.iter().enumerate() {
            if !(100..=599).contains(st) {
                errs.push(format!("{at}.fail_on_status[{k}]"), "must be an HTTP status (100-599)");
            }
        }
        if let Some(o) = &c.origin_fallback
            && let Err(e) = check_provider_url(&o.url)
        {
            errs.push(format!("{at}.origin_fallback.url"), e);
        }
        if !matches!(c.route_key.as_str(), "directory" | "path") {
            errs.push(format!("{at}.route_key"), "use \"directory\" or \"path\"");
        }
        if c.timeout.is_zero() || c.cooldown.is_zero() || c.cooldown_after == 0 {
            errs.push(
                at.clone(),
                "timeout and cooldown must be greater than zero, cooldown_after at least 1",
            );
        }
        if c.penalty_half_life.is_zero() {
            errs.push(format!("{at}.penalty_half_life"), "must be greater than zero");
        }
        if c.recommend_after == 0 || c.recommend_ttl.is_zero() {
            errs.push(
                at.clone(),
                "recommend_after must be at least 1 and recommend_ttl greater than zero",
            );
        }
        if c.replay_limit.bytes() > 16 << 20 {
            errs.push(format!("{at}.replay_limit"), "must be at most 16MiB");
        }
    }

    let mut hosts: HashMap<String, usize> = HashMap::new();
    let mut default_site: Option<usize> = None;
    for (i, site) in config.site.iter().enumerate() {
        let at = format!("site[{i}]");
        if site.hosts.is_empty() && !site.default {
            errs.push(format!("{at}.hosts"), "a site needs hosts or `default = true`");
        }
        if site.default {
            if let Some(prev) = default_site {
                errs.push(
                    format!("{at}.default"),
                    format!("only one site may be the default (site[{prev}] already is)"),
                );
            }
            default_site = Some(i);
        }
        for (j, h) in site.hosts.iter().enumerate() {
            let hat = format!("{at}.hosts[{j}]");
            match normalise_host_pattern(h) {
                Ok(norm) => {
                    if let Some(prev) = hosts.insert(norm, i) {
                        if prev == i {
                            errs.push(hat, format!("host \"{h}\" is listed twice in this site"));
                        } else {
                            errs.push(hat, format!("host \"{h}\" is already served by site[{prev}]"));
                        }
                    }
                }
                Err(e) => errs.push(hat, e),
            }
        }
        if site.https_redirect && s.tls.is_none() {
            errs.push(
                format!("{at}.https_redirect"),
                "redirecting to HTTPS needs a TLS listener (server.tls)",
            );
        }
        if site.route.is_empty() {
            errs.push(format!("{at}.route"), "a site needs at least one route");
        }
        let mut seen = HashSet::new();
        for (j, r) in site.route.iter().enumerate() {
            let rat = format!("{at}.route[{j}]");
            let set: Vec<(&str, &String)> = [("path", &r.path), ("exact", &r.exact), ("glob", &r.glob)]
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
                .collect();
            match set.as_slice() {
                [] => errs.push(rat.clone(), "set one of `path` (prefix), `exact` or `glob`"),
                [(k, v)] => {
                    if !v.starts_with('/') {
                        errs.push(format!("{rat}.{k}"), "must start with `/`");
                    }
                    if !seen.insert(format!("{k}:{v}")) {
                        errs.push(format!("{rat}.{k}"), format!("duplicate route for {k} \"{v}\""));
                    }
                    if *k != "path" && (r.strip_prefix || r.rewrite_prefix.is_some()) {
                        errs.push(
                            rat.clone(),
                            "`strip_prefix` and `rewrite_prefix` apply to prefix (`path`) routes only",
                        );
                    }
                }
                _ => errs.push(rat.clone(), "set only one of `path`, `exact` and `glob`"),
            }
            if r.strip_prefix && r.rewrite_prefix.is_some() {
                errs.push(
                    format!("{rat}.rewrite_prefix"),
                    "set either `strip_prefix` or `rewrite_prefix`, not both",
                );
            }
            if let Some(rw) = &r.rewrite_prefix
                && !rw.starts_with('/')
            {
                errs.push(format!("{rat}.rewrite_prefix"), "must start with `/`");
            }
            match (&r.pool, &r.chain) {
                (Some(pool), None) => {
                    if !pools.contains_key(pool.as_str()) {
                        let hint = suggest(pool, pools.keys().copied())
                            .map(|s| format!(" (did you mean \"{s}\"?)"))
                            .unwrap_or_default();
                        errs.push(format!("{rat}.pool"), format!("no pool named \"{pool}\"{hint}"));
                    }
                }
                (None, Some(chain)) => {
                    if !chains.contains(chain.as_str()) {
                        let hint = suggest(chain, chains.iter().copied())
                            .map(|s| format!(" (did you mean \"{s}\"?)"))
                            .unwrap_or_default();
                        errs.push(format!("{rat}.chain"), format!("no chain named \"{chain}\"{hint}"));
                    }
                }
                (None, None) => errs.push(rat.clone(), "set `pool` or `chain`"),
                (Some(_), Some(_)) => errs.push(rat.clone(), "set either `pool` or `chain`, not both"),
            }
            if r.host_header.trim().is_empty() {
                errs.push(
                    format!("{rat}.host_header"),
                    "use \"preserve\", \"backend\" or a host name",
                );
            } else if http::HeaderValue::from_str(&r.host_header).is_err() {
                errs.push(format!("{rat}.host_header"), "is not a valid header value");
            }
            if let Some(c) = &r.cache {
                let cat = format!("{rat}.cache");
                for (k, h) in c.key_headers.iter().chain(c.bypass_headers.iter()).enumerate() {
                    if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                        errs.push(cat.clone(), format!("header `{h}` ({k}) is not a valid header name"));
                    }
                }
                if c.query_allow.is_some() && !c.ignore_query.is_empty() {
                    errs.push(
                        format!("{cat}.query_allow"),
                        "set either `query_allow` or `ignore_query`, not both",
                    );
                }
                if let (Some(min), Some(max)) = (c.min_ttl, c.max_ttl)
                    && min > max
                {
                    errs.push(format!("{cat}.min_ttl"), "must not be greater than max_ttl");
                }
            }
            if r.tunnel_idle_timeout.is_zero() {
                errs.push(format!("{rat}.tunnel_idle_timeout"), "must be greater than zero");
            }
        }
    }
    if config.site.is_empty() {
        errs.push("site", "no sites: add at least one [[site]] with a route");
    }

    errs.into_result(())?;
    Ok(Validated {
        config,
        admin_token,
        admin_tokens,
        metrics_allow,
        purge_allow,
        trusted_proxies: trusted,
        warnings,
        hash: stable_hash(text),
        base_dir: base_dir.to_path_buf(),
    })
}

fn valid_status_spec(spec: &str) -> bool {
    let code = |s: &str| s.trim().parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
    !spec.trim().is_empty()
        && spec.split(',').all(|part| match part.split_once('-') {
            Some((lo, hi)) => code(lo) && code(hi),
            None => code(part),
        })
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

fn check_listen(errs: &mut ConfigErrors, seen: &mut HashSet<SocketAddr>, at: &str, v: &str) {
    match v.parse::<SocketAddr>() {
        Ok(a) => {
            if a.port() != 0 && !seen.insert(a) {
                errs.push(at, format!("address {a} is used by another listener"));
            }
        }
        Err(_) => errs.push(
            at,
            format!("`{v}` is not an address like \"127.0.0.1:8080\" or \"[::]:443\""),
        ),
    }
}

/// Check a backend URL: `http` or `https`, a host, an optional port, no path or query.
pub fn check_backend_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(other) => return Err(format!("scheme `{other}` is not supported (use http or https)")),
        None => return Err(format!("`{url}` needs a scheme (http:// or https://)")),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => {}
        _ => return Err(format!("`{url}` has no host")),
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("`{url}` must not have a path; use the route's rewrite_prefix"));
    }
    if uri.query().is_some() {
        return Err(format!("`{url}` must not have a query"));
    }
    Ok(uri)
}

/// A provider URL: like a backend URL, but it may carry a base path.
pub fn check_provider_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{url}` needs an http:// or https:// scheme")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("`{url}` must not have a query"));
    }
    Ok(uri)
}

/// Lower-case a host pattern and check it: a name, an IP, or `*.suffix`. IPv6
/// addresses are kept in brackets (`[::1]`), as they appear in `Host` headers.
pub fn normalise_host_pattern(h: &str) -> Result<String, String> {
    let h = h.trim().trim_end_matches('.').to_ascii_lowercase();
    let bare = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(&h);
    if let Ok(v6) = bare.parse::<std::net::Ipv6Addr>() {
        return Ok(format!("[{v6}]"));
    }
    let name = h.strip_prefix("*.").unwrap_or(&h);
    if name.is_empty() {
        return Err("host must not be empty".into());
    }
    if name.contains('*') {
        return Err(format!(
            "`{h}`: a wildcard is allowed only as the first label (`*.example.com`)"
        ));
    }
    if name.contains(':') {
        return Err(format!("`{h}`: host patterns must not include a port"));
    }
    let ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !ok {
        return Err(format!("`{h}` is not a valid host name"));
    }
    Ok(h)
}

#[cfg(test)]
mod tests;
