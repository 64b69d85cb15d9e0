//! The rule expression language: a subset of Cloudflare's Rules language
//! (wirefilter), compiled once when the config loads and evaluated per request
//! without allocating in the common cases.
//!
//! ```text
//! expr     := and ( ("or" | "||") and )*
//! and      := unary ( ("and" | "&&") unary )*
//! unary    := ("not" | "!") unary | "(" expr ")" | test
//! test     := value [ op rhs ]              (a value alone must be a boolean)
//! value    := field | func "(" value ["," literal] ")" | literal
//! field    := http.request.method | http.request.uri | http.request.uri.path
//!           | http.request.uri.query | http.request.headers["name"] | http.user_agent
//!           | http.host | http.cookie | http.referer | http.request.body.raw
//!           | http.request.body.size | http.request.body.truncated | ip.src | ssl
//! func     := lower | upper | url_decode | len | starts_with | ends_with
//! op       := eq | == | ne | != | contains | matches | ~ | in
//!           | lt | < | le | <= | gt | > | ge | >=
//! rhs      := "string" | r"raw" | integer | IP | CIDR | "{" literal* "}"
//! ```
//!
//! Types are checked at compile time: strings take `eq ne contains matches in`,
//! integers `eq ne lt le gt ge in` (with `a..b` ranges in sets), IPs `eq ne in` (with
//! CIDRs in sets). `matches` uses the `regex` crate (linear time) with a 1 MiB size
//! limit. Errors give the column and what was expected.

use super::access::compile_regex;
use http::{HeaderMap, HeaderName};
use memchr::memmem::Finder;
use rampart_config::Cidr;
use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

/// What an expression is evaluated against.
pub struct Request<'a> {
    pub method: &'a str,
    /// Path and query as received... after normalisation of the path.
    pub uri: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub host: &'a str,
    pub ip: IpAddr,
    pub tls: bool,
    /// The inspected prefix of the body (empty when there is none or it was not read).
    pub body: &'a [u8],
    /// The body's size when known (`Content-Length`, or the bytes read).
    pub body_size: u64,
    /// The body was longer than the inspection bound.
    pub body_truncated: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Type {
    Bytes,
    Int,
    Ip,
    Bool,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Bytes => "a string",
            Type::Int => "an integer",
            Type::Ip => "an IP address",
            Type::Bool => "a boolean",
        }
    }
}

#[derive(Clone, Debug)]
enum Field {
    Method,
    Uri,
    Path,
    Query,
    Header(HeaderName),
    Host,
    Body,
    BodySize,
    BodyTruncated,
    IpSrc,
    Tls,
}

impl Field {
    fn ty(&self) -> Type {
        match self {
            Field::BodySize => Type::Int,
            Field::BodyTruncated | Field::Tls => Type::Bool,
            Field::IpSrc => Type::Ip,
            _ => Type::Bytes,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Func {
    Lower,
    Upper,
    UrlDecode,
    Len,
    StartsWith,
    EndsWith,
}

#[derive(Debug)]
enum Value {
    Field(Field),
    Call(Func, Box<Value>, Option<Vec<u8>>),
    Bytes(Vec<u8>),
    Int(i64),
}

impl Value {
    fn ty(&self) -> Type {
        match self {
            Value::Field(f) => f.ty(),
            Value::Call(Func::Len, ..) => Type::Int,
            Value::Call(Func::StartsWith | Func::EndsWith, ..) => Type::Bool,
            Value::Call(..) | Value::Bytes(_) => Type::Bytes,
            Value::Int(_) => Type::Int,
        }
    }
}

enum Op {
    BytesEq(Vec<u8>, bool),
    Contains(Box<Finder<'static>>),
    Matches(regex::bytes::Regex),
    BytesIn(HashSet<Vec<u8>>),
    IntCmp(std::cmp::Ordering, bool, i64),
    IntIn(Vec<(i64, i64)>),
    IpEq(IpAddr, bool),
    IpIn(Vec<Cidr>),
}

enum Node {
    Or(Vec<Node>),
    And(Vec<Node>),
    Not(Box<Node>),
    Test(Value, Op),
    Bool(Value),
}

/// A compiled expression.
pub struct Expr {
    root: Node,
    /// Whether it reads the request body.
    pub reads_body: bool,
}

/// A syntax or type error: the byte offset and what was expected.
#[derive(Debug, PartialEq, Eq)]
pub struct Error {
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at column {}: {}", self.column, self.message)
    }
}

/// The longest expression accepted (and the deepest nesting), so a config cannot
/// make compilation or evaluation unbounded.
const MAX_LEN: usize = 16 * 1024;
const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
    reads_body: bool,
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

impl<'a> Parser<'a> {
    fn err<T>(&self, at: usize, message: impl Into<String>) -> Result<T, Error> {
        Err(Error {
            column: self.src[..at.min(self.src.len())].chars().count() + 1,
            message: message.into(),
        })
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.src.len() - trimmed.len();
    }

    /// What is at the cursor, for error messages.
    fn found(&self) -> String {
        let r = self.rest();
        if r.is_empty() {
            return "the end".into();
        }
        let word: String = r.chars().take_while(|c| !c.is_whitespace()).take(20).collect();
        format!("`{word}`")
    }

    /// The identifier-like word at the cursor (without consuming it).
    fn peek_word(&self) -> &'a str {
        let r = self.rest();
        let end = r.find(|c: char| !ident_char(c)).unwrap_or(r.len());
        &r[..end]
    }

    fn eat_word(&mut self, w: &str) -> bool {
        self.skip_ws();
        if self.peek_word() == w {
            self.pos += w.len();
            true
        } else {
            false
        }
    }

    fn eat(&mut self, s: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Result<Node, Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.err(self.pos, format!("nesting deeper than {MAX_DEPTH}"));
        }
        let mut terms = vec![self.and()?];
        while self.eat_word("or") || self.eat("||") {
            terms.push(self.and()?);
        }
        self.depth -= 1;
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Node::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Node, Error> {
        let mut terms = vec![self.unary()?];
        while self.eat_word("and") || self.eat("&&") {
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Node::And(terms)
        })
    }

    fn unary(&mut self) -> Result<Node, Error> {
        self.skip_ws();
        if self.eat_word("not") || (self.rest().starts_with('!') && !self.rest().starts_with("!=") && self.eat("!")) {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return self.err(self.pos, format!("nesting deeper than {MAX_DEPTH}"));
            }
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Node::Not(Box::new(inner)));
        }
        if self.eat("(") {
            let inner = self.expr()?;
            if !self.eat(")") {
                return self.err(self.pos, format!("expected `)`, found {}", self.found()));
            }
            return Ok(inner);
        }
        self.test()
    }

    fn test(&mut self) -> Result<Node, Error> {
        self.skip_ws();
        let start = self.pos;
        let value = self.value()?;
        let ty = value.ty();
        self.skip_ws();
        let op_at = self.pos;
        let Some(op) = self.operator() else {
            if ty == Type::Bool {
                return Ok(Node::Bool(value));
            }
            return self.err(
                op_at,
                format!(
                    "expected an operator after {} ({}), found {}",
                    &self.src[start..op_at].trim_end(),
                    ty.name(),
                    self.found()
                ),
            );
        };
        let allowed: &[&str] = match ty {
            Type::Bytes => &["eq", "ne", "contains", "matches", "in"],
            Type::Int => &["eq", "ne", "lt", "le", "gt", "ge", "in"],
            Type::Ip => &["eq", "ne", "in"],
            Type::Bool => &[],
        };
        if !allowed.contains(&op) {
            let list = if allowed.is_empty() {
                "none: use it alone".to_string()
            } else {
                allowed.join(", ")
            };
            return self.err(
                op_at,
                format!("`{op}` does not apply to {} (allowed: {list})", ty.name()),
            );
        }
        self.skip_ws();
        let rhs_at = self.pos;
        let op = match (ty, op) {
            (Type::Bytes, "eq" | "ne") => Op::BytesEq(self.string()?, op == "eq"),
            (Type::Bytes, "contains") => Op::Contains(Box::new(Finder::new(&self.string()?).into_owned())),
            (Type::Bytes, "matches") => {
                let pattern = self.string()?;
                let pattern = String::from_utf8(pattern).or_else(|_| self.err(rhs_at, "a regex must be UTF-8"))?;
                match compile_regex(&pattern) {
                    Ok(re) => Op::Matches(re),
                    Err(e) => return self.err(rhs_at, e),
                }
            }
            (Type::Bytes, _) => {
                let mut set = HashSet::new();
                self.set(|p| {
                    set.insert(p.string()?);
                    Ok(())
                })?;
                Op::BytesIn(set)
            }
            (Type::Int, "in") => {
                let mut ranges = Vec::new();
                self.set(|p| {
                    let a = p.int()?;
                    let b = if p.eat("..") { p.int()? } else { a };
                    ranges.push((a.min(b), a.max(b)));
                    Ok(())
                })?;
                Op::IntIn(ranges)
            }
            (Type::Int, _) => {
                use std::cmp::Ordering::{Equal, Greater, Less};
                let n = self.int()?;
                match op {
                    "eq" => Op::IntCmp(Equal, true, n),
                    "ne" => Op::IntCmp(Equal, false, n),
                    "lt" => Op::IntCmp(Less, true, n),
                    "ge" => Op::IntCmp(Less, false, n),
                    "gt" => Op::IntCmp(Greater, true, n),
                    _ => Op::IntCmp(Greater, false, n),
                }
            }
            (Type::Ip, "in") => {
                let mut nets = Vec::new();
                self.set(|p| {
                    nets.push(p.cidr()?);
                    Ok(())
                })?;
                Op::IpIn(nets)
            }
            (Type::Ip, _) => {
                let at = self.pos;
                self.cidr()?;
                let text = self.src[at..self.pos].to_string();
                match text.parse::<IpAddr>() {
                    Ok(ip) => Op::IpEq(ip, op == "eq"),
                    Err(_) => {
                        return self.err(
                            at,
                            format!("expected an IP address, found `{text}` (use `in {{…}}` for networks)"),
                        );
                    }
                }
            }
            (Type::Bool, _) => return self.err(op_at, "booleans take no operator"),
        };
        Ok(Node::Test(value, op))
    }

    /// Read an operator, normalised to its word form.
    fn operator(&mut self) -> Option<&'static str> {
        const SYMBOLS: [(&str, &str); 9] = [
            ("==", "eq"),
            ("!=", "ne"),
            ("<=", "le"),
            (">=", "ge"),
            ("<", "lt"),
            (">", "gt"),
            ("~", "matches"),
            ("eq", "eq"),
            ("ne", "ne"),
        ];
        for (sym, word) in SYMBOLS {
            if sym.starts_with(|c: char| !c.is_ascii_alphabetic()) && self.rest().starts_with(sym) {
                self.pos += sym.len();
                return Some(word);
            }
        }
        let w = self.peek_word();
        let word = ["eq", "ne", "contains", "matches", "in", "lt", "le", "gt", "ge"]
            .into_iter()
            .find(|k| *k == w)?;
        self.pos += w.len();
        Some(word)
    }

    /// `{ item item ... }` (commas allowed between items).
    fn set(&mut self, mut item: impl FnMut(&mut Self) -> Result<(), Error>) -> Result<(), Error> {
        self.skip_ws();
        let start = self.pos;
        if !self.eat("{") {
            return self.err(
                self.pos,
                format!("expected `{{` to start a set, found {}", self.found()),
            );
        }
        let mut n = 0;
        loop {
            if self.eat("}") {
                break;
            }
            if n > 0 {
                self.eat(",");
                self.skip_ws();
            }
            if self.rest().is_empty() {
                return self.err(self.pos, "expected `}` to end the set, found the end");
            }
            item(self)?;
            n += 1;
        }
        if n == 0 {
            return self.err(start, "a set needs at least one item");
        }
        Ok(())
    }

    fn value(&mut self) -> Result<Value, Error> {
        self.skip_ws();
        let at = self.pos;
        let r = self.rest();
        if r.starts_with('"') || r.starts_with("r\"") || r.starts_with("r#") {
            return Ok(Value::Bytes(self.string()?));
        }
        if r.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
            return Ok(Value::Int(self.int()?));
        }
        let word = self.peek_word();
        if word.is_empty() {
            return self.err(
                at,
                format!("expected a field, function or value, found {}", self.found()),
            );
        }
        self.pos += word.len();
        if self.rest().starts_with('(') {
            return self.call(word, at);
        }
        let field = match word {
            "http.request.method" => Field::Method,
            "http.request.uri" => Field::Uri,
            "http.request.uri.path" => Field::Path,
            "http.request.uri.query" => Field::Query,
            "http.user_agent" => Field::Header(http::header::USER_AGENT),
            "http.cookie" => Field::Header(http::header::COOKIE),
            "http.referer" => Field::Header(http::header::REFERER),
            "http.host" => Field::Host,
            "http.request.body.raw" => Field::Body,
            "http.request.body.size" => Field::BodySize,
            "http.request.body.truncated" => Field::BodyTruncated,
            "ip.src" => Field::IpSrc,
            "ssl" => Field::Tls,
            "http.request.headers" => {
                if !self.eat("[") {
                    return self.err(self.pos, "expected `[\"name\"]` after http.request.headers");
                }
                self.skip_ws();
                let name_at = self.pos;
                let name = self.string()?;
                let Ok(name) = HeaderName::from_bytes(&name) else {
                    return self.err(name_at, "not a valid header name");
                };
                if !self.eat("]") {
                    return self.err(self.pos, format!("expected `]`, found {}", self.found()));
                }
                Field::Header(name)
            }
            other => return self.err(at, format!("unknown field `{other}`")),
        };
        if matches!(field, Field::Body | Field::BodySize | Field::BodyTruncated) {
            self.reads_body = true;
        }
        Ok(Value::Field(field))
    }

    fn call(&mut self, name: &str, at: usize) -> Result<Value, Error> {
        let func = match name {
            "lower" => Func::Lower,
            "upper" => Func::Upper,
            "url_decode" => Func::UrlDecode,
            "len" => Func::Len,
            "starts_with" => Func::StartsWith,
            "ends_with" => Func::EndsWith,
            other => return self.err(at, format!("unknown function `{other}`")),
        };
        self.eat("(");
        self.skip_ws();
        let arg_at = self.pos;
        let arg = self.value()?;
        if arg.ty() != Type::Bytes {
            return self.err(arg_at, format!("`{name}` takes a string, not {}", arg.ty().name()));
        }
        let second = if matches!(func, Func::StartsWith | Func::EndsWith) {
            if !self.eat(",") {
                return self.err(
                    self.pos,
                    format!("expected `,` and a string for `{name}`, found {}", self.found()),
                );
            }
            self.skip_ws();
            Some(self.string()?)
        } else {
            None
        };
        if !self.eat(")") {
            return self.err(
                self.pos,
                format!("expected `)` to close `{name}(`, found {}", self.found()),
            );
        }
        Ok(Value::Call(func, Box::new(arg), second))
    }

    /// `"..."` with `\"`, `\\` and `\xHH` escapes, or `r"..."` / `r#"..."#` raw.
    fn string(&mut self) -> Result<Vec<u8>, Error> {
        self.skip_ws();
        let at = self.pos;
        let r = self.rest();
        if let Some(raw) = r.strip_prefix('r') {
            let hashes = raw.chars().take_while(|c| *c == '#').count();
            let body = &raw[hashes..];
            let Some(body) = body.strip_prefix('"') else {
                return self.err(at, format!("expected a string, found {}", self.found()));
            };
            let close = format!("\"{}", "#".repeat(hashes));
            let Some(end) = body.find(&close) else {
                return self.err(at, "unterminated raw string");
            };
            self.pos += 1 + hashes + 1 + end + close.len();
            return Ok(body.as_bytes()[..end].to_vec());
        }
        let Some(body) = r.strip_prefix('"') else {
            return self.err(
                at,
                format!("expected a string in double quotes, found {}", self.found()),
            );
        };
        let mut out = Vec::new();
        let bytes = body.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'"' => {
                    self.pos += 1 + i + 1;
                    return Ok(out);
                }
                b'\\' => {
                    match bytes.get(i + 1) {
                        Some(b'"') => out.push(b'"'),
                        Some(b'\\') => out.push(b'\\'),
                        Some(b'x') => {
                            let hex = body.get(i + 2..i + 4).and_then(|h| u8::from_str_radix(h, 16).ok());
                            let Some(v) = hex else {
                                return self.err(self.pos + 1 + i, "`\\x` needs two hex digits");
                            };
                            out.push(v);
                            i += 2;
                        }
                        _ => return self.err(self.pos + 1 + i, "unknown escape (use \\\", \\\\ or \\xHH)"),
                    }
                    i += 2;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        self.err(at, "unterminated string")
    }

    fn int(&mut self) -> Result<i64, Error> {
        self.skip_ws();
        let r = self.rest();
        let end = r
            .char_indices()
            .find(|(i, c)| !(c.is_ascii_digit() || (*i == 0 && *c == '-')))
            .map_or(r.len(), |(i, _)| i);
        match r[..end].parse() {
            Ok(n) => {
                self.pos += end;
                Ok(n)
            }
            Err(_) => self.err(self.pos, format!("expected an integer, found {}", self.found())),
        }
    }

    fn cidr(&mut self) -> Result<Cidr, Error> {
        self.skip_ws();
        let r = self.rest();
        let end = r
            .find(|c: char| !(c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/')))
            .unwrap_or(r.len());
        match r[..end].parse::<Cidr>() {
            Ok(c) if end > 0 => {
                self.pos += end;
                Ok(c)
            }
            _ => self.err(
                self.pos,
                format!("expected an IP address or CIDR, found {}", self.found()),
            ),
        }
    }
}

impl Expr {
    pub fn compile(src: &str) -> Result<Expr, Error> {
        if src.len() > MAX_LEN {
            return Err(Error {
                column: 1,
                message: format!("longer than {MAX_LEN} bytes"),
            });
        }
        let mut p = Parser {
            src,
            pos: 0,
            depth: 0,
            reads_body: false,
        };
        let root = p.expr()?;
        p.skip_ws();
        if !p.rest().is_empty() {
            return p.err(p.pos, format!("expected `and`, `or` or the end, found {}", p.found()));
        }
        Ok(Expr {
            root,
            reads_body: p.reads_body,
        })
    }

    pub fn matches(&self, r: &Request<'_>) -> bool {
        eval(&self.root, r)
    }
}

fn eval(n: &Node, r: &Request<'_>) -> bool {
    match n {
        Node::Or(list) => list.iter().any(|n| eval(n, r)),
        Node::And(list) => list.iter().all(|n| eval(n, r)),
        Node::Not(inner) => !eval(inner, r),
        Node::Bool(v) => bool_of(v, r),
        Node::Test(v, op) => match op {
            Op::BytesEq(lit, eq) => (bytes_of(v, r).as_ref() == lit.as_slice()) == *eq,
            Op::Contains(f) => f.find(&bytes_of(v, r)).is_some(),
            Op::Matches(re) => re.is_match(&bytes_of(v, r)),
            Op::BytesIn(set) => set.contains(bytes_of(v, r).as_ref()),
            Op::IntCmp(ord, want, n) => (int_of(v, r).cmp(n) == *ord) == *want,
            Op::IntIn(ranges) => {
                let x = int_of(v, r);
                ranges.iter().any(|(a, b)| (*a..=*b).contains(&x))
            }
            Op::IpEq(ip, eq) => (ip_of(v, r) == Some(*ip)) == *eq,
            Op::IpIn(nets) => ip_of(v, r).is_some_and(|ip| nets.iter().any(|c| c.contains(ip))),
        },
    }
}

fn header<'a>(h: &'a HeaderMap, name: &HeaderName) -> Cow<'a, [u8]> {
    let mut values = h.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Cow::Borrowed(b""),
        (Some(v), None) => Cow::Borrowed(v.as_bytes()),
        (Some(a), Some(b)) => {
            let mut out = a.as_bytes().to_vec();
            for v in std::iter::once(b).chain(values) {
                out.extend_from_slice(b", ");
                out.extend_from_slice(v.as_bytes());
            }
            Cow::Owned(out)
        }
    }
}

fn url_decode(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b'+', ..) => {
                out.push(b' ');
                i += 1;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fn bytes_of<'a>(v: &'a Value, r: &Request<'a>) -> Cow<'a, [u8]> {
    match v {
        Value::Bytes(b) => Cow::Borrowed(b),
        Value::Field(f) => match f {
            Field::Method => Cow::Borrowed(r.method.as_bytes()),
            Field::Uri => Cow::Borrowed(r.uri.as_bytes()),
            Field::Path => Cow::Borrowed(r.path.as_bytes()),
            Field::Query => Cow::Borrowed(r.query.as_bytes()),
            Field::Header(n) => header(r.headers, n),
            Field::Host => Cow::Borrowed(r.host.as_bytes()),
            Field::Body => Cow::Borrowed(r.body),
            _ => Cow::Borrowed(b""),
        },
        Value::Call(f, arg, _) => {
            let a = bytes_of(arg, r);
            match f {
                Func::Lower if a.iter().any(u8::is_ascii_uppercase) => Cow::Owned(a.to_ascii_lowercase()),
                Func::Upper if a.iter().any(u8::is_ascii_lowercase) => Cow::Owned(a.to_ascii_uppercase()),
                Func::UrlDecode if a.iter().any(|c| *c == b'%' || *c == b'+') => Cow::Owned(url_decode(&a)),
                _ => a,
            }
        }
        Value::Int(_) => Cow::Borrowed(b""),
    }
}

fn int_of(v: &Value, r: &Request<'_>) -> i64 {
    match v {
        Value::Int(n) => *n,
        Value::Field(Field::BodySize) => i64::try_from(r.body_size).unwrap_or(i64::MAX),
        Value::Call(Func::Len, arg, _) => i64::try_from(bytes_of(arg, r).len()).unwrap_or(i64::MAX),
        _ => 0,
    }
}

fn ip_of(v: &Value, r: &Request<'_>) -> Option<IpAddr> {
    match v {
        Value::Field(Field::IpSrc) => Some(r.ip),
        _ => None,
    }
}

fn bool_of(v: &Value, r: &Request<'_>) -> bool {
    match v {
        Value::Field(Field::Tls) => r.tls,
        Value::Field(Field::BodyTruncated) => r.body_truncated,
        Value::Call(f @ (Func::StartsWith | Func::EndsWith), arg, Some(lit)) => {
            let a = bytes_of(arg, r);
            if *f == Func::StartsWith {
                a.starts_with(lit)
            } else {
                a.ends_with(lit)
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(h: &'a HeaderMap, body: &'a [u8]) -> Request<'a> {
        Request {
            method: "POST",
            uri: "/api/login?user=admin&q=%27%20OR%201%3D1",
            path: "/api/login",
            query: "user=admin&q=%27%20OR%201%3D1",
            headers: h,
            host: "shop.example",
            ip: "203.0.113.7".parse().unwrap(),
            tls: true,
            body,
            body_size: body.len() as u64,
            body_truncated: false,
        }
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("user-agent", "Mozilla/5.0 SQLMap".parse().unwrap());
        h.append("x-tag", "a".parse().unwrap());
        h.append("x-tag", "b".parse().unwrap());
        h
    }

    fn eval_src(src: &str) -> bool {
        let h = headers();
        Expr::compile(src)
            .unwrap_or_else(|e| panic!("{src}: {e}"))
            .matches(&req(&h, b"{\"password\":\"x\"}"))
    }

    #[test]
    fn operators() {
        for (src, want) in [
            (r#"http.request.method eq "POST""#, true),
            (r#"http.request.method == "GET""#, false),
            (r#"http.request.method ne "GET""#, true),
            (r#"http.request.method in {"PUT" "POST"}"#, true),
            (r#"http.request.uri.path contains "/login""#, true),
            (r#"http.request.uri.path matches "^/api/(login|logout)$""#, true),
            (r#"http.request.uri.path ~ "^/admin""#, false),
            (r#"lower(http.user_agent) contains "sqlmap""#, true),
            (r#"http.user_agent contains "sqlmap""#, false),
            (r#"upper(http.host) eq "SHOP.EXAMPLE""#, true),
            (r#"url_decode(http.request.uri.query) contains "' OR 1=1""#, true),
            (r#"http.request.headers["x-tag"] eq "a, b""#, true),
            (r#"http.request.headers["x-missing"] eq """#, true),
            (r#"len(http.request.uri.path) gt 5"#, true),
            (r#"len(http.request.uri.path) le 5"#, false),
            (r#"len(http.host) in {1..5 12}"#, true),
            (r#"http.request.body.size >= 16"#, true),
            (r#"http.request.body.raw contains "password""#, true),
            (r#"ip.src in {203.0.113.0/24 2001:db8::/32}"#, true),
            (r#"ip.src eq 203.0.113.8"#, false),
            (r#"ip.src ne 203.0.113.8"#, true),
            (r#"ssl"#, true),
            (r#"not ssl"#, false),
            (r#"starts_with(http.request.uri.path, "/api/")"#, true),
            (r#"ends_with(http.host, ".test")"#, false),
            (
                r#"http.host eq "x" or (http.request.method eq "POST" and not ip.src in {10.0.0.0/8})"#,
                true,
            ),
            (r#"http.host eq "x" || http.request.method eq "POST" && !ssl"#, false),
            (r#"http.request.uri.path eq r"/api/login""#, true),
            (r#"http.request.uri.path eq "\x2fapi/login""#, true),
        ] {
            assert_eq!(eval_src(src), want, "{src}");
        }
    }

    #[test]
    fn errors_say_where_and_what() {
        for (src, column, needle) in [
            (r#"http.request.method = "GET""#, 21, "expected an operator"),
            (
                r#"http.request.methd eq "GET""#,
                1,
                "unknown field `http.request.methd`",
            ),
            (r#"http.request.method lt "GET""#, 21, "`lt` does not apply to a string"),
            (
                r#"ip.src contains "1""#,
                8,
                "`contains` does not apply to an IP address",
            ),
            (r#"len(http.host) eq "x""#, 19, "expected an integer"),
            (r#"http.host eq "x" and"#, 21, "expected a field"),
            (r#"(http.host eq "x""#, 18, "expected `)`"),
            (r#"http.host matches "(unclosed""#, 19, "invalid regex"),
            (r#"http.host eq "x" xor ssl"#, 18, "expected `and`, `or` or the end"),
            (r#"lower(ip.src) eq "x""#, 7, "`lower` takes a string"),
            (r#"shout(http.host) eq "x""#, 1, "unknown function `shout`"),
            (r#"http.host in {}"#, 14, "at least one item"),
            (r#"http.host eq "unterminated"#, 14, "unterminated string"),
            (r#"ip.src eq 10.0.0.0/8"#, 11, "use `in {…}` for networks"),
        ] {
            let e = match Expr::compile(src) {
                Err(e) => e,
                Ok(_) => panic!("{src} compiled"),
            };
            assert!(e.message.contains(needle), "{src}: {e}");
            assert_eq!(e.column, column, "{src}: {e}");
        }
        let deep = format!("{}ssl{}", "(".repeat(100), ")".repeat(100));
        assert!(
            Expr::compile(&deep)
                .err()
                .is_some_and(|e| e.message.contains("nesting"))
        );
        assert!(Expr::compile(&"ssl or ".repeat(5000)).is_err(), "over the length bound");
    }

    #[test]
    fn body_use_is_known_at_compile_time() {
        assert!(
            Expr::compile(r#"http.request.body.raw contains "x""#)
                .unwrap()
                .reads_body
        );
        assert!(!Expr::compile(r#"http.host eq "x""#).unwrap().reads_body);
    }
}
