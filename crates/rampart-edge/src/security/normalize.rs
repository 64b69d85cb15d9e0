//! One normalised view of the request path, used by routing, every security stage,
//! the cache key, and what is forwarded upstream, so no stage can be bypassed by a
//! different reading of the same bytes.
//!
//! In order:
//! 1. `%25XX` (an encoded `%` before two hex digits) is double encoding: rejected, or
//!    with `double_encoding = "decode"` decoded (at most three rounds).
//! 2. Percent-encodings are checked (`%` + two hex digits, else 400); encoded
//!    unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; the rest stay encoded
//!    with upper-case hex. Encoded control characters (`%00`–`%1F`, `%7F`) are rejected.
//! 3. Encoded separators (`%2F`, `%5C`) are kept, rejected, or decoded to `/`.
//! 4. Duplicate slashes are merged when configured.
//! 5. Dot segments are removed (RFC 3986 §5.2.4).
//!
//! Whatever the settings, a path that would still hold a `.` or `..` segment once an
//! upstream decoded it (`..%2F`, `%5C..%5C`) is rejected: no encoded traversal survives.

use rampart_config::{DoubleEncoding, EncodedSlash, Normalize};
use std::borrow::Cow;

/// Why a path was refused (the `detail` of a `BAD_PATH` answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    InvalidEncoding,
    ControlCharacter,
    EncodedSeparator,
    EncodedTraversal,
    DoubleEncoding,
}

impl PathError {
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::InvalidEncoding => "invalid-percent-encoding",
            PathError::ControlCharacter => "control-character",
            PathError::EncodedSeparator => "encoded-separator",
            PathError::EncodedTraversal => "encoded-traversal",
            PathError::DoubleEncoding => "double-encoding",
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The byte encoded at `s[i..i+3]`, if that is a valid `%XX`.
fn encoded_at(s: &[u8], i: usize) -> Option<u8> {
    match (s.get(i), s.get(i + 1), s.get(i + 2)) {
        (Some(b'%'), Some(&h), Some(&l)) => Some(hex(h)? << 4 | hex(l)?),
        _ => None,
    }
}

/// `%25` followed by two hex digits at `i`: an encoded `%` that encodes a byte.
fn double_at(b: &[u8], i: usize) -> bool {
    encoded_at(b, i) == Some(b'%')
        && b.get(i + 3).and_then(|c| hex(*c)).is_some()
        && b.get(i + 4).and_then(|c| hex(*c)).is_some()
}

fn has_double_encoding(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).any(|i| double_at(b, i))
}

/// Replace each `%25XX` with `%XX` (one round of decoding of encoded percents).
fn decode_percent_once(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if double_at(b, i) {
            out.push(b'%');
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decode every `%XX` (for checks only; never forwarded).
fn decode_all(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match encoded_at(b, i) {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Normalise a request path (without the query) under the policy. The result is a
/// fixed point: normalising it again gives it back unchanged.
pub fn normalize_path<'a>(raw: &'a str, p: &Normalize) -> Result<Cow<'a, str>, PathError> {
    // Fast path: nothing encoded, no dot segments, no empty segments to merge.
    if raw.starts_with('/') && needs_nothing(raw.as_bytes(), p.merge_slashes) {
        return Ok(Cow::Borrowed(raw));
    }
    // One pass can create what another would change (`%25` then `%41` then a hex
    // digit spells a new `%25XX`): repeat to a fixed point, or refuse.
    let mut cur = normalize_once(raw, p)?;
    for _ in 0..3 {
        let next = normalize_once(&cur, p)?;
        if next == cur {
            return Ok(Cow::Owned(cur));
        }
        cur = next;
    }
    Err(PathError::DoubleEncoding)
}

/// Whether `raw` is a path normalising leaves as it is: no `%`, `\\` or control
/// character, no `.` or `..` segment and (with `merge`) no `//`. One pass over the
/// bytes (splitting on `/` and searching for `//` took about 200 instructions for
/// `/`).
fn needs_nothing(raw: &[u8], merge: bool) -> bool {
    let dots = |seg: &[u8]| seg == b"." || seg == b"..";
    let mut seg_start = 0;
    for (i, &b) in raw.iter().enumerate() {
        match b {
            b'%' | b'\\' | 0x7f | 0..0x20 => return false,
            b'/' => {
                if dots(&raw[seg_start..i]) || (merge && i > 0 && raw[i - 1] == b'/') {
                    return false;
                }
                seg_start = i + 1;
            }
            _ => {}
        }
    }
    !dots(&raw[seg_start..])
}

fn normalize_once(raw: &str, p: &Normalize) -> Result<String, PathError> {
    let mut s: Cow<'_, str> = Cow::Borrowed(raw);
    if has_double_encoding(&s) {
        if p.double_encoding == DoubleEncoding::Reject {
            return Err(PathError::DoubleEncoding);
        }
        for _ in 0..3 {
            s = Cow::Owned(decode_percent_once(&s));
            if !has_double_encoding(&s) {
                break;
            }
        }
        if has_double_encoding(&s) {
            return Err(PathError::DoubleEncoding);
        }
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let v = encoded_at(b, i).ok_or(PathError::InvalidEncoding)?;
            i += 3;
            if v < 0x20 || v == 0x7f {
                return Err(PathError::ControlCharacter);
            }
            if unreserved(v) {
                out.push(char::from(v));
            } else if v == b'/' || v == b'\\' {
                match p.encoded_slash {
                    EncodedSlash::Reject => return Err(PathError::EncodedSeparator),
                    EncodedSlash::Decode => out.push('/'),
                    EncodedSlash::Keep => out.push_str(if v == b'/' { "%2F" } else { "%5C" }),
                }
            } else if v == b'%' {
                // Only left after decoding rounds: `%25` not followed by hex digits.
                out.push_str("%25");
            } else {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(v >> 4)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(v & 0xf)]));
            }
            continue;
        }
        if c < 0x20 || c == 0x7f {
            return Err(PathError::ControlCharacter);
        }
        // A raw backslash is a separator to some servers: treat it like `%5C`.
        if c == b'\\' {
            match p.encoded_slash {
                EncodedSlash::Reject => return Err(PathError::EncodedSeparator),
                EncodedSlash::Decode => out.push('/'),
                EncodedSlash::Keep => out.push_str("%5C"),
            }
            i += 1;
            continue;
        }
        // Copy the run of ordinary bytes (UTF-8 sequences stay whole).
        let start = i;
        while i < b.len() && b[i] != b'%' && b[i] != b'\\' && b[i] >= 0x20 && b[i] != 0x7f {
            i += 1;
        }
        out.push_str(&s[start..i]);
    }
    if p.merge_slashes {
        while out.contains("//") {
            out = out.replace("//", "/");
        }
    }
    let out = match remove_dot_segments(&out) {
        Cow::Borrowed(_) => out,
        Cow::Owned(o) => o,
    };
    // An upstream that decodes `%2F`/`%5C` (or `%25`, however often) must not find
    // a traversal.
    let mut decoded = out.clone();
    for _ in 0..4 {
        if decoded.split(['/', '\\']).any(|seg| seg == "." || seg == "..") {
            return Err(PathError::EncodedTraversal);
        }
        let next = decode_all_str(&decoded);
        if next == decoded {
            break;
        }
        decoded = next;
    }
    Ok(out)
}

fn decode_all_str(s: &str) -> String {
    String::from_utf8_lossy(&decode_all(s)).into_owned()
}

/// Check a query string: valid percent-encoding and no encoded NUL. It is forwarded
/// as received (applications may sign it byte for byte).
pub fn check_query(q: &str) -> Result<(), PathError> {
    let b = q.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let v = encoded_at(b, i).ok_or(PathError::InvalidEncoding)?;
                if v == 0 {
                    return Err(PathError::ControlCharacter);
                }
                i += 3;
            }
            c if c < 0x20 || c == 0x7f => return Err(PathError::ControlCharacter),
            _ => i += 1,
        }
    }
    Ok(())
}

/// Remove `.` and `..` segments (RFC 3986 §5.2.4): `/api/../admin` is `/admin`, and
/// cannot match a `/api/` route. Paths without dot segments are borrowed as is.
pub fn remove_dot_segments(path: &str) -> Cow<'_, str> {
    let has_dots = path.split('/').any(|seg| seg == "." || seg == "..");
    if !has_dots || !path.starts_with('/') {
        return Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path[1..].split('/').collect();
    let last = segs.len() - 1;
    for (i, seg) in segs.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    Cow::Owned(format!("/{}", out.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(merge: bool, slash: EncodedSlash, double: DoubleEncoding) -> Normalize {
        Normalize {
            merge_slashes: merge,
            encoded_slash: slash,
            double_encoding: double,
        }
    }

    /// The one-pass check agrees with the reading it replaced (split on `/`,
    /// search for `//`).
    #[test]
    fn the_fast_check_matches_split_and_search() {
        let by_split = |raw: &str, merge: bool| {
            let marked = raw.bytes().any(|b| b == b'%' || b < 0x20 || b == 0x7f || b == b'\\');
            let dots = raw.split('/').any(|seg| seg == "." || seg == "..");
            let doubled = merge && raw.contains("//");
            !(marked || dots || doubled)
        };
        let paths = [
            "/",
            "//",
            "/a",
            "/a/",
            "/a//b",
            "/./",
            "/.",
            "/..",
            "/a/..",
            "/a/../b",
            "/a/.b",
            "/a/b.",
            "/...",
            "/a/..b",
            "/%41",
            "/a\\b",
            "/a\tb",
            "/a\x7fb",
            "/é/ü",
            "/a/b/c/d.png",
            "/.well-known/x",
            "",
        ];
        for raw in paths {
            for merge in [false, true] {
                assert_eq!(
                    needs_nothing(raw.as_bytes(), merge),
                    by_split(raw, merge),
                    "{raw:?} merge={merge}"
                );
            }
        }
    }

    fn n(p: &str) -> Result<String, PathError> {
        normalize_path(p, &Normalize::default()).map(Cow::into_owned)
    }

    #[test]
    fn decodes_unreserved_and_normalises_hex() {
        assert_eq!(n("/%61%62c").unwrap(), "/abc");
        assert_eq!(n("/a%2db%7E").unwrap(), "/a-b~");
        assert_eq!(n("/a%20b%3f").unwrap(), "/a%20b%3F");
        assert_eq!(n("/caf%C3%A9").unwrap(), "/caf%C3%A9");
        assert_eq!(n("/plain/path").unwrap(), "/plain/path");
    }

    #[test]
    fn dot_segments_encoded_or_not() {
        assert_eq!(n("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(n("/a/%2e%2e/c").unwrap(), "/c");
        assert_eq!(n("/a/%2E/c/.").unwrap(), "/a/c/");
        assert_eq!(n("/../../etc/passwd").unwrap(), "/etc/passwd");
    }

    #[test]
    fn dot_segments() {
        assert_eq!(remove_dot_segments("/a/b"), "/a/b");
        assert_eq!(remove_dot_segments("/api/../admin"), "/admin");
        assert_eq!(remove_dot_segments("/a/./b/../c"), "/a/c");
        assert_eq!(remove_dot_segments("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(remove_dot_segments("/a/b/.."), "/a/");
        assert_eq!(remove_dot_segments("/a/b/."), "/a/b/");
        assert_eq!(remove_dot_segments("/a/..b/c"), "/a/..b/c");
        assert_eq!(remove_dot_segments("/.."), "/");
        for p in ["/a/../../b/./c/..", "/x/./y/../../z/", "/../a/.."] {
            let once = remove_dot_segments(p).into_owned();
            assert_eq!(remove_dot_segments(&once), once.as_str(), "idempotent for {p}");
            assert!(!once.split('/').any(|s| s == ".."), "{once}");
        }
    }

    #[test]
    fn rejections() {
        assert_eq!(n("/a%zz"), Err(PathError::InvalidEncoding));
        assert_eq!(n("/a%4"), Err(PathError::InvalidEncoding));
        assert_eq!(n("/a%00b"), Err(PathError::ControlCharacter));
        assert_eq!(n("/a%0d%0aSet-Cookie"), Err(PathError::ControlCharacter));
        assert_eq!(n("/a%252e%252e/"), Err(PathError::DoubleEncoding));
        // Kept encoded separators may not hide a traversal.
        assert_eq!(n("/a/..%2F..%2Fetc"), Err(PathError::EncodedTraversal));
        assert_eq!(n("/a/%2e%2e%5cwin"), Err(PathError::EncodedTraversal));
        assert_eq!(n("/a%2Fb").unwrap(), "/a%2Fb");
    }

    #[test]
    fn settings() {
        let reject = policy(false, EncodedSlash::Reject, DoubleEncoding::Reject);
        assert_eq!(normalize_path("/a%2fb", &reject), Err(PathError::EncodedSeparator));
        let decode = policy(true, EncodedSlash::Decode, DoubleEncoding::Decode);
        assert_eq!(normalize_path("/a%2fb//c", &decode).unwrap(), "/a/b/c");
        assert_eq!(normalize_path("/x/%252e%252e/y", &decode).unwrap(), "/y");
        assert_eq!(normalize_path("/a/..%2F..%2Fetc", &decode).unwrap(), "/etc");
        // Triple encoding still decodes within the bound; deeper is refused.
        assert_eq!(normalize_path("/%25252e", &decode).unwrap(), "/");
        assert_eq!(normalize_path("/%252525252e", &decode), Err(PathError::DoubleEncoding));
        let merge = policy(true, EncodedSlash::Keep, DoubleEncoding::Reject);
        assert_eq!(normalize_path("//a///b", &merge).unwrap(), "/a/b");
    }

    #[test]
    fn queries() {
        assert!(check_query("a=1&b=%20x").is_ok());
        assert_eq!(check_query("a=%zz"), Err(PathError::InvalidEncoding));
        assert_eq!(check_query("a=%00"), Err(PathError::ControlCharacter));
    }

    /// A small deterministic generator of hostile paths for the property tests.
    fn paths(seed: u64, count: usize) -> Vec<String> {
        const PIECES: &[&str] = &[
            "/", "//", "a", "b", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%252e", "%25252f", "%41", "%7e",
            "%20", "%", "%zz", "%00", "\\", "~", "-", "é", "%C3%A9", "?",
        ];
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..count)
            .map(|_| {
                let mut p = String::from("/");
                for _ in 0..rng.usize(1..12) {
                    p.push_str(PIECES[rng.usize(..PIECES.len())]);
                }
                p
            })
            .collect()
    }

    #[test]
    fn normalising_twice_changes_nothing_and_no_traversal_survives() {
        let settings = [
            Normalize::default(),
            policy(true, EncodedSlash::Decode, DoubleEncoding::Decode),
            policy(false, EncodedSlash::Reject, DoubleEncoding::Reject),
            policy(true, EncodedSlash::Keep, DoubleEncoding::Decode),
        ];
        for (k, s) in settings.iter().enumerate() {
            for p in paths(0x5eed + k as u64, 20_000) {
                let Ok(once) = normalize_path(&p, s) else { continue };
                let twice = normalize_path(&once, s);
                assert_eq!(twice.as_deref(), Ok(once.as_ref()), "idempotent: {p:?} → {once:?}");
                // However many times an upstream decodes it, no dot segment appears.
                let mut d = once.to_string();
                for _ in 0..4 {
                    d = decode_all_str(&d);
                    assert!(
                        !d.split(['/', '\\']).any(|seg| seg == "." || seg == ".."),
                        "traversal survives in {p:?} → {once:?} → {d:?}"
                    );
                }
                assert!(once.starts_with('/'), "{once:?}");
                assert!(!once.bytes().any(|b| b < 0x20 || b == 0x7f), "{once:?}");
            }
        }
    }
}
