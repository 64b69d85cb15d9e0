//! Header handling between client and upstream: hop-by-hop removal (RFC 9110
//! §7.6.1), `X-Forwarded-*`, `Via`, request ids and the client address.

use http::header::{self, AsHeaderName, HeaderMap, HeaderName, HeaderValue};
use rampart_config::Cidr;
use std::net::IpAddr;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_RAMPART_REASON: HeaderName = HeaderName::from_static("x-rampart-reason");
pub static X_RAMPART_UPSTREAM: HeaderName = HeaderName::from_static("x-rampart-upstream");
pub static X_RAMPART_ROUTE: HeaderName = HeaderName::from_static("x-rampart-route");
pub static X_RAMPART_ATTEMPTS: HeaderName = HeaderName::from_static("x-rampart-attempts");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The elements of a comma-separated list field (RFC 9110 §5.6.1) over all its
/// lines, trimmed, empty elements skipped. Lines that are not visible ASCII are skipped.
pub fn list_elements<K: AsHeaderName>(h: &HeaderMap, name: K) -> impl Iterator<Item = &str> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

/// The elements of one comma-separated field value as raw bytes (as `httparse`
/// gives it), trimmed, empty elements skipped.
pub(crate) fn value_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
}

/// Remove hop-by-hop headers: the fixed set and every header named in `Connection`.
/// `TE: trailers` is kept when `keep_te_trailers` (it is end-to-end in meaning for HTTP/2 and gRPC).
///
/// One pass over the names finds which are present; most messages carry none but
/// `Connection: keep-alive`, so the removals (each a hash and probe) are only done
/// for headers that are there.
pub fn remove_hop_by_hop(h: &mut HeaderMap, keep_te_trailers: bool) {
    let present = fields_present(h);
    remove_hop_by_hop_present(h, keep_te_trailers, present);
}

/// [`remove_hop_by_hop`], knowing which of the fields are there ([`fields_present`]).
pub fn remove_hop_by_hop_present(h: &mut HeaderMap, keep_te_trailers: bool, present: u16) {
    if present & HOP_ANY == 0 {
        return;
    }
    if present & HOP_CONNECTION != 0 {
        // Taken out in one lookup, then read. `close` and `keep-alive` are the usual
        // tokens; neither names a header beyond the fixed set, so the common case
        // allocates nothing.
        let mut named: Vec<HeaderName> = Vec::new();
        if let http::header::Entry::Occupied(e) = h.entry(header::CONNECTION) {
            for v in e.remove_entry_mult().1 {
                let tokens = v.to_str().unwrap_or("").split(',').map(str::trim);
                named.extend(
                    tokens
                        .filter(|t| !t.is_empty())
                        .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
                        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()),
                );
            }
        }
        for n in named {
            h.remove(n);
        }
    }
    for (bit, name) in [
        (HOP_KEEP_ALIVE, &KEEP_ALIVE),
        (HOP_PROXY_CONNECTION, &PROXY_CONNECTION),
        (HOP_TRANSFER_ENCODING, &header::TRANSFER_ENCODING),
        (HOP_UPGRADE, &header::UPGRADE),
        (HOP_TRAILER, &header::TRAILER),
    ] {
        if present & bit != 0 {
            h.remove(name);
        }
    }
    if present & HOP_TE != 0 {
        let trailers = keep_te_trailers
            && h.get_all(header::TE)
                .iter()
                .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        if !trailers {
            h.remove(header::TE);
        }
    }
}

const HOP_CONNECTION: u16 = 1;
const HOP_KEEP_ALIVE: u16 = 2;
const HOP_PROXY_CONNECTION: u16 = 4;
const HOP_TRANSFER_ENCODING: u16 = 8;
const HOP_UPGRADE: u16 = 16;
const HOP_TRAILER: u16 = 32;
const HOP_TE: u16 = 64;
const HOP_ANY: u16 = 127;
/// The fields the proxy sets on a request to an upstream.
pub const FIELD_X_FORWARDED_FOR: u16 = 1 << 8;
pub const FIELD_X_FORWARDED_PROTO: u16 = 1 << 9;
pub const FIELD_X_FORWARDED_HOST: u16 = 1 << 10;
pub const FIELD_VIA: u16 = 1 << 11;
pub const FIELD_X_REQUEST_ID: u16 = 1 << 12;

/// Which hop-by-hop fields, and which of the fields the proxy sets, `h` has: one
/// pass over the names, so that lookups and removals are done only for fields that
/// are there (most messages carry none of them but `Connection: keep-alive`).
pub fn fields_present(h: &HeaderMap) -> u16 {
    let mut present = 0;
    for name in h.keys() {
        present |= field_bit(name);
    }
    present
}

fn field_bit(name: &HeaderName) -> u16 {
    match name.as_str() {
        "connection" => HOP_CONNECTION,
        "keep-alive" => HOP_KEEP_ALIVE,
        "proxy-connection" => HOP_PROXY_CONNECTION,
        "transfer-encoding" => HOP_TRANSFER_ENCODING,
        "upgrade" => HOP_UPGRADE,
        "trailer" => HOP_TRAILER,
        "te" => HOP_TE,
        "x-forwarded-for" => FIELD_X_FORWARDED_FOR,
        "x-forwarded-proto" => FIELD_X_FORWARDED_PROTO,
        "x-forwarded-host" => FIELD_X_FORWARDED_HOST,
        "via" => FIELD_VIA,
        "x-request-id" => FIELD_X_REQUEST_ID,
        _ => 0,
    }
}

/// The upgrade protocol a request asks for (`Connection: upgrade` + `Upgrade: x`), if any.
pub fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let conn_upgrade = list_elements(h, header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if !conn_upgrade {
        return None;
    }
    h.get(header::UPGRADE).cloned()
}

/// Give the map's values memory of their own: one allocation for all of them,
/// each value a view into it. Values parsed from an upstream's response are views
/// into that connection's read buffer (16 KiB); an HTTP/2 encoder keeps the values
/// it indexes in its dynamic table for as long as the client's connection lasts,
/// and with them that whole buffer.
pub fn detach_values(map: &mut HeaderMap) {
    let total: usize = map.values().map(HeaderValue::len).sum();
    let mut all = bytes::BytesMut::with_capacity(total);
    for v in map.values() {
        all.extend_from_slice(v.as_bytes());
    }
    let all = all.freeze();
    let mut at = 0;
    for v in map.values_mut() {
        let n = v.len();
        // SAFETY: the same bytes as `v`'s, a valid value already; checking every
        // byte again cost about 1,900 instructions per HTTP/2 response.
        let mut own = unsafe { HeaderValue::from_maybe_shared_unchecked(all.slice(at..at + n)) };
        own.set_sensitive(v.is_sensitive());
        *v = own;
        at += n;
    }
}

pub fn is_trusted(trusted: &[Cidr], ip: IpAddr) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// The client address: the socket peer, or, when the peer is a trusted proxy, the
/// right-most address in `X-Forwarded-For` that is not itself trusted.
pub fn client_ip(h: &HeaderMap, peer: IpAddr, trusted: &[Cidr]) -> IpAddr {
    if !is_trusted(trusted, peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = list_elements(h, &X_FORWARDED_FOR)
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .collect();
    for ip in hops.iter().rev() {
        if !is_trusted(trusted, *ip) {
            return *ip;
        }
    }
    hops.first().copied().unwrap_or(peer)
}

/// Set `X-Forwarded-For`/`-Proto`/`-Host`. From a trusted proxy the existing values are
/// kept and the peer appended to `X-Forwarded-For`; from anyone else they are replaced.
///
/// `peer` is the socket peer's address as a header value, made once per connection.
pub fn set_forwarded(h: &mut HeaderMap, peer: &HeaderValue, trusted_peer: bool, tls: bool, host: Option<&HeaderValue>) {
    let prior: Vec<&str> = if trusted_peer {
        h.get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    if prior.is_empty() {
        h.insert(&X_FORWARDED_FOR, peer.clone());
    } else if let Ok(v) = HeaderValue::from_str(&format!("{}, {}", prior.join(", "), peer.to_str().unwrap_or(""))) {
        h.insert(&X_FORWARDED_FOR, v);
    }
    // From a trusted proxy an existing value stands; otherwise ours replaces it.
    // One hash and probe each, through the entry.
    match h.entry(&X_FORWARDED_PROTO) {
        http::header::Entry::Occupied(_) if trusted_peer => {}
        http::header::Entry::Occupied(mut e) => {
            e.insert(proto_value(tls));
        }
        http::header::Entry::Vacant(e) => {
            e.insert(proto_value(tls));
        }
    }
    if let Some(host) = host {
        match h.entry(&X_FORWARDED_HOST) {
            http::header::Entry::Occupied(_) if trusted_peer => {}
            http::header::Entry::Occupied(mut e) => {
                e.insert(host.clone());
            }
            http::header::Entry::Vacant(e) => {
                e.insert(host.clone());
            }
        }
    }
}

/// Append our `Via` entry (`1.1 rampart`, `2 rampart`) to any existing ones.
pub fn append_via(h: &mut HeaderMap, version: http::Version) {
    let ours = via_entry(version);
    // One hash and probe whether or not a Via is there.
    match h.entry(header::VIA) {
        http::header::Entry::Occupied(e) => {
            let (_, prior) = e.remove_entry_mult();
            let prior: Vec<HeaderValue> = prior.collect();
            h.insert(header::VIA, via_after(&prior, ours));
        }
        http::header::Entry::Vacant(e) => {
            e.insert(via_value(version));
        }
    }
}

/// Our `Via` entry for a message received as `version` (RFC 9110 §7.6.3).
pub fn via_entry(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => VIA_2,
        http::Version::HTTP_10 => VIA_10,
        _ => VIA_11,
    }
}

const VIA_2: &str = "2 rampart";
const VIA_10: &str = "1.0 rampart";
const VIA_11: &str = "1.1 rampart";

/// [`via_entry`] as a header value, built at compile time (`from_static` at run time
/// checks every byte, on every request).
pub fn via_value(version: http::Version) -> HeaderValue {
    const V2: HeaderValue = HeaderValue::from_static(VIA_2);
    const V10: HeaderValue = HeaderValue::from_static(VIA_10);
    const V11: HeaderValue = HeaderValue::from_static(VIA_11);
    match version {
        http::Version::HTTP_2 => V2,
        http::Version::HTTP_10 => V10,
        _ => V11,
    }
}

/// The `X-Forwarded-Proto` value for a connection with or without TLS, built at
/// compile time.
pub fn proto_value(tls: bool) -> HeaderValue {
    const HTTP: HeaderValue = HeaderValue::from_static("http");
    const HTTPS: HeaderValue = HeaderValue::from_static("https");
    if tls { HTTPS } else { HTTP }
}

/// One `Via` value: the `prior` lines' entries, then `ours`.
pub fn via_after(prior: &[HeaderValue], ours: &'static str) -> HeaderValue {
    let mut v = Vec::with_capacity(prior.iter().map(|p| p.len() + 2).sum::<usize>() + ours.len());
    for p in prior {
        v.extend_from_slice(p.as_bytes());
        v.extend_from_slice(b", ");
    }
    v.extend_from_slice(ours.as_bytes());
    // Field values joined with ", " and a token are a field value again.
    HeaderValue::from_bytes(&v).unwrap_or(HeaderValue::from_static(ours))
}

/// Append one field line, `name: value` and CRLF, as the HTTP/1 encoders write it.
#[inline(always)]
pub(crate) fn write_field(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A request's id: made here (32 lower-case hex digits, kept inline: copying it
/// costs no allocation and no reference count), or taken from a trusted proxy.
#[derive(Clone)]
pub enum RequestId {
    Made([u8; 32]),
    Given(HeaderValue),
}

impl RequestId {
    /// A new id from a fast random source.
    pub fn generate() -> RequestId {
        // Each byte's two digits, looked up whole.
        const PAIRS: [[u8; 2]; 256] = {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut t = [[0u8; 2]; 256];
            let mut i = 0;
            while i < 256 {
                t[i] = [HEX[i >> 4], HEX[i & 0xf]];
                i += 1;
            }
            t
        };
        let mut out = [0u8; 32];
        for (pair, byte) in out.chunks_exact_mut(2).zip(fastrand::u128(..).to_be_bytes()) {
            pair.copy_from_slice(&PAIRS[usize::from(byte)]);
        }
        RequestId::Made(out)
    }

    /// A trusted proxy's id when it sent a sane one, else a new one.
    pub fn given_or_new(given: Option<&HeaderValue>) -> RequestId {
        match given {
            Some(v) if acceptable_request_id(v) => RequestId::Given(v.clone()),
            _ => RequestId::generate(),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Made(b) => b,
            RequestId::Given(v) => v.as_bytes(),
        }
    }

    /// As text (every id is visible ASCII: made of hex digits, or checked by
    /// [`acceptable_request_id`]).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("-")
    }

    /// As a value for a header map (a made id is copied into one). Marked
    /// sensitive: an HTTP/2 encoder then sends it as a literal that is never
    /// indexed. An id is new on every message, so a table entry for it would only
    /// push out entries that repeat (h2's encoder spent a tenth of an HTTP/2
    /// proxy's CPU on that churn).
    pub fn header_value(&self) -> HeaderValue {
        let mut v = match self {
            RequestId::Made(b) => HeaderValue::from_bytes(b).unwrap_or(HeaderValue::from_static("-")),
            RequestId::Given(v) => v.clone(),
        };
        v.set_sensitive(true);
        v
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An incoming request id is honoured only from a trusted proxy and only if it is sane.
pub fn acceptable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// The value of cookie `name` in the request's `Cookie` fields.
pub fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Bytes the request head's header fields take on the wire (`name: value\r\n`).
pub fn header_bytes(h: &HeaderMap) -> usize {
    h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum()
}

/// The length `Content-Length` gives over all its lines, read strictly (RFC 9110
/// §8.6): digits only, and a list of the same number is one length. `Ok(None)`
/// without the field; `Err` with a value that is not a length, or copies that
/// disagree.
pub(crate) fn content_length(h: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut length: Option<u64> = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        length = Some(length_elements(v.as_bytes(), length)?);
    }
    Ok(length)
}

/// One `Content-Length` field's value: a length, or a list of equal lengths.
pub(crate) fn length_value(value: &[u8]) -> Option<u64> {
    length_elements(value, None).ok()
}

/// The length a `Content-Length` value states, which must agree with `before`
/// (from earlier fields).
fn length_elements(value: &[u8], mut before: Option<u64>) -> Result<u64, &'static str> {
    for part in value.split(|b| *b == b',') {
        let part = part.trim_ascii();
        // 19 digits always fit in a u64.
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err("bad content-length");
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if before.is_some_and(|l| l != n) {
            return Err("conflicting content-length values");
        }
        before = Some(n);
    }
    before.ok_or("bad content-length")
}

/// Where one field of a parsed message head lies in it: the name's offset and
/// length, then the value's.
pub(crate) type Span = (u32, u32, u32, u32);

/// A head with at most this many fields records their spans in a small array (no
/// zeroing of a full-size one per message).
const FEW_FIELDS: usize = 16;

/// Room for the spans of a head's fields: a small array for the usual few, an
/// array of `N` (the most a head may have) only for a head with more. It lives on
/// the stack for one parse (boxing the large variant would allocate per message).
#[allow(clippy::large_enum_variant)]
pub(crate) enum SpanSlots<const N: usize> {
    Few([Span; FEW_FIELDS]),
    All([Span; N]),
}

impl<const N: usize> SpanSlots<N> {
    /// Room for `fields` spans (at least; at most `N`).
    #[inline]
    pub(crate) fn for_fields(fields: usize) -> Self {
        if fields <= FEW_FIELDS {
            SpanSlots::Few([(0, 0, 0, 0); FEW_FIELDS])
        } else {
            SpanSlots::All([(0, 0, 0, 0); N])
        }
    }

    #[inline]
    pub(crate) fn slots(&mut self) -> &mut [Span] {
        match self {
            SpanSlots::Few(a) => a,
            SpanSlots::All(a) => a,
        }
    }
}

/// Record where httparse found each of `fields` in `head` (the buffer it parsed),
/// so the fields can be sliced out once the head is split off that buffer (a
/// stack array of spans: no allocation per message).
pub(crate) fn spans(head: &[u8], fields: &[httparse::Header<'_>], out: &mut [Span]) {
    let base = head.as_ptr() as usize;
    // Offsets within a head (bounded far below 4 GiB) fit in u32; a field outside
    // `head` gets an offset `header_map` refuses.
    let at = |p: *const u8| u32::try_from((p as usize).wrapping_sub(base)).unwrap_or(u32::MAX);
    for (span, h) in out.iter_mut().zip(fields) {
        let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        *span = (
            at(h.name.as_ptr()),
            len(h.name.len()),
            at(h.value.as_ptr()),
            len(h.value.len()),
        );
    }
}

/// The standard name for `name` when it is one of the fields most messages carry,
/// in any letter case; `None` for the rest (then `HeaderName::from_bytes` decides).
/// `name` must be an RFC 9110 token, as httparse checks field names to be: for
/// tokens, `| 0x20` folds exactly the letters, so the comparison is a case-blind
/// match. The general parser folds and matches byte by byte through every standard
/// name of the length; for the nine fields of a typical response that cost about
/// 1.5k instructions per message.
#[inline]
pub(crate) fn common_name(name: &[u8]) -> Option<HeaderName> {
    let first = *name.first()? | 0x20;
    let is = |lower: &[u8]| eq_folded(name, lower);
    Some(match (name.len(), first) {
        (3, b'a') if is(b"age") => header::AGE,
        (4, b'd') if is(b"date") => header::DATE,
        (4, b'e') if is(b"etag") => header::ETAG,
        (4, b'h') if is(b"host") => header::HOST,
        (4, b'v') if is(b"vary") => header::VARY,
        (5, b'r') if is(b"range") => header::RANGE,
        (6, b'a') if is(b"accept") => header::ACCEPT,
        (6, b'c') if is(b"cookie") => header::COOKIE,
        (6, b'o') if is(b"origin") => header::ORIGIN,
        (6, b'p') if is(b"pragma") => header::PRAGMA,
        (6, b's') if is(b"server") => header::SERVER,
        (7, b'e') if is(b"expires") => header::EXPIRES,
        (7, b'r') if is(b"referer") => header::REFERER,
        (7, b'u') if is(b"upgrade") => header::UPGRADE,
        (8, b'l') if is(b"location") => header::LOCATION,
        (10, b'c') if is(b"connection") => header::CONNECTION,
        (10, b'k') if is(b"keep-alive") => KEEP_ALIVE.clone(),
        (10, b's') if is(b"set-cookie") => header::SET_COOKIE,
        (10, b'u') if is(b"user-agent") => header::USER_AGENT,
        (12, b'c') if is(b"content-type") => header::CONTENT_TYPE,
        (12, b'x') if is(b"x-request-id") => X_REQUEST_ID.clone(),
        (13, b'a') if is(b"accept-ranges") => header::ACCEPT_RANGES,
        (13, b'a') if is(b"authorization") => header::AUTHORIZATION,
        (13, b'c') if is(b"cache-control") => header::CACHE_CONTROL,
        (13, b'i') if is(b"if-none-match") => header::IF_NONE_MATCH,
        (13, b'l') if is(b"last-modified") => header::LAST_MODIFIED,
        (14, b'c') if is(b"content-length") => header::CONTENT_LENGTH,
        (15, b'a') if is(b"accept-encoding") => header::ACCEPT_ENCODING,
        (15, b'a') if is(b"accept-language") => header::ACCEPT_LANGUAGE,
        (15, b'x') if is(b"x-forwarded-for") => X_FORWARDED_FOR.clone(),
        (16, b'c') if is(b"content-encoding") => header::CONTENT_ENCODING,
        (17, b'i') if is(b"if-modified-since") => header::IF_MODIFIED_SINCE,
        (17, b't') if is(b"transfer-encoding") => header::TRANSFER_ENCODING,
        _ => return None,
    })
}

/// `name` equals the lower-case `lower` when its letters are folded (see `common_name`).
#[inline]
pub(crate) fn eq_folded(name: &[u8], lower: &[u8]) -> bool {
    if name.len() != lower.len() {
        return false;
    }
    let (mut a, mut b) = (name, lower);
    while let (Some((x, rest_a)), Some((y, rest_b))) = (a.split_first_chunk::<8>(), b.split_first_chunk::<8>()) {
        if u64::from_ne_bytes(*x) | 0x2020_2020_2020_2020 != u64::from_ne_bytes(*y) {
            return false;
        }
        (a, b) = (rest_a, rest_b);
    }
    a.iter().zip(b).all(|(&x, &y)| x | 0x20 == y)
}

/// The header map of a head split off its buffer, from the fields' `spans`: names
/// checked, values sharing `head`'s memory, and room for `room` more fields (the
/// ones the pipeline adds: growing the map rehashes it). `None` if a name is not
/// a valid one.
pub(crate) fn header_map(head: &bytes::Bytes, spans: &[Span], room: usize) -> Option<HeaderMap> {
    let mut headers = HeaderMap::with_capacity(spans.len() + room);
    for &(name_at, name_len, value_at, value_len) in spans {
        let (name_at, value_at) = (name_at as usize, value_at as usize);
        let name = head.get(name_at..name_at + name_len as usize)?;
        let name = match common_name(name) {
            Some(n) => n,
            None => HeaderName::from_bytes(name).ok()?,
        };
        let value_end = value_at + value_len as usize;
        head.get(value_at..value_end)?;
        // SAFETY: httparse accepted these bytes as a field value, and its value
        // byte set (HTAB, 0x20-0x7E, 0x80-0xFF) is exactly what HeaderValue allows;
        // checking every byte again cost about 700 instructions per message.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(value_at..value_end)) };
        headers.append(name, value);
    }
    Some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                h.append(k, v);
            }
        }
        h
    }

    #[test]
    fn list_elements_span_lines_and_skip_empties() {
        let mut h = map(&[
            ("vary", " Accept-Encoding ,, cookie"),
            ("vary", ""),
            ("vary", "origin,"),
        ]);
        h.append(header::VARY, HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let got: Vec<&str> = list_elements(&h, header::VARY).collect();
        assert_eq!(got, ["Accept-Encoding", "cookie", "origin"]);
    }

    #[test]
    fn hop_by_hop() {
        let mut h = map(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("x-keep", "yes"),
        ]);
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        let mut h = map(&[("te", "trailers")]);
        remove_hop_by_hop(&mut h, true);
        assert!(h.contains_key("te"));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn client_address() {
        let trusted: Vec<Cidr> = ["10.0.0.0/8"].iter().filter_map(|s| s.parse().ok()).collect();
        let h = map(&[("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("x-forwarded-for", "10.0.0.5")]);
        assert_eq!(client_ip(&h, ip("10.0.0.9"), &trusted), ip("2.2.2.2"));
        assert_eq!(client_ip(&h, ip("8.8.8.8"), &trusted), ip("8.8.8.8"), "untrusted peer");
    }

    #[test]
    fn forwarded() {
        let mut h = map(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-proto", "https")]);
        set_forwarded(&mut h, &HeaderValue::from_static("10.0.0.1"), true, false, None);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        let mut h = map(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-proto", "https")]);
        set_forwarded(&mut h, &HeaderValue::from_static("9.9.9.9"), false, false, None);
        assert_eq!(h["x-forwarded-for"], "9.9.9.9");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn via_is_added_after_every_prior_entry() {
        let mut h = map(&[("via", "1.0 a"), ("via", "1.1 b, 2 c")]);
        append_via(&mut h, http::Version::HTTP_11);
        let all: Vec<_> = h.get_all("via").iter().collect();
        assert_eq!(all, ["1.0 a, 1.1 b, 2 c, 1.1 rampart"]);
        let mut h = map(&[]);
        append_via(&mut h, http::Version::HTTP_2);
        assert_eq!(h["via"], "2 rampart");
        assert_eq!(via_after(&[], via_entry(http::Version::HTTP_10)), "1.0 rampart");
        for v in [http::Version::HTTP_10, http::Version::HTTP_11, http::Version::HTTP_2] {
            assert_eq!(via_value(v), via_entry(v));
        }
        assert_eq!(proto_value(false), "http");
        assert_eq!(proto_value(true), "https");
    }

    #[test]
    fn present_fields_are_found_in_one_pass() {
        let h = map(&[
            ("via", "x"),
            ("x-request-id", "r"),
            ("te", "trailers"),
            ("x-other", "o"),
        ]);
        let p = fields_present(&h);
        assert_eq!(p & (FIELD_VIA | FIELD_X_REQUEST_ID), FIELD_VIA | FIELD_X_REQUEST_ID);
        assert_eq!(
            p & (FIELD_X_FORWARDED_FOR | FIELD_X_FORWARDED_PROTO | FIELD_X_FORWARDED_HOST),
            0
        );
        assert_eq!(p & HOP_ANY, HOP_TE);
        assert_eq!(fields_present(&map(&[("x-other", "o")])), 0);
    }

    #[test]
    fn detached_values_no_longer_share_the_buffer_they_were_read_from() {
        let buf = bytes::Bytes::from_static(b"xx\"abc\"yyMon, 1 Jan").slice(0..);
        let mut m = HeaderMap::new();
        m.insert(header::ETAG, HeaderValue::from_maybe_shared(buf.slice(2..7)).unwrap());
        m.append(header::VARY, HeaderValue::from_static("a"));
        m.append(header::VARY, HeaderValue::from_static("b"));
        let mut id = HeaderValue::from_static("id-1");
        id.set_sensitive(true);
        m.insert(&X_REQUEST_ID, id);
        m.insert(header::DATE, HeaderValue::from_maybe_shared(buf.slice(9..)).unwrap());
        let before: Vec<(String, Vec<u8>)> = m.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        detach_values(&mut m);
        let after: Vec<(String, Vec<u8>)> = m.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        assert_eq!(before, after);
        let range = buf.as_ptr_range();
        for v in m.values() {
            assert!(
                !range.contains(&v.as_bytes().as_ptr()),
                "{v:?} still points into the buffer"
            );
        }
        assert!(m[&X_REQUEST_ID].is_sensitive());
        assert!(!m[header::ETAG].is_sensitive());
    }

    #[test]
    fn ids() {
        let a = RequestId::generate();
        assert_eq!(a.as_bytes().len(), 32);
        assert_ne!(a.as_bytes(), RequestId::generate().as_bytes());
        assert!(acceptable_request_id(&a.header_value()));
        assert_eq!(a.header_value(), a.as_str());
        // Never indexed by an HTTP/2 encoder, made or given.
        assert!(a.header_value().is_sensitive());
        let given = RequestId::given_or_new(Some(&HeaderValue::from_static("edge-1")));
        assert!(given.header_value().is_sensitive());
        assert!(!acceptable_request_id(&HeaderValue::from_static("a b")));
        // The digits are the random value's, in order.
        for seed in [0, 7, u64::MAX] {
            fastrand::seed(seed);
            let expected = format!("{:032x}", fastrand::u128(..));
            fastrand::seed(seed);
            assert_eq!(RequestId::generate().as_str(), expected);
        }
        // A trusted proxy's id is kept when sane, replaced when not.
        let given = HeaderValue::from_static("edge-1:abc_2.x");
        assert_eq!(RequestId::given_or_new(Some(&given)).as_str(), "edge-1:abc_2.x");
        assert_eq!(
            RequestId::given_or_new(Some(&HeaderValue::from_static("a b")))
                .as_bytes()
                .len(),
            32
        );
        assert_eq!(RequestId::given_or_new(None).as_bytes().len(), 32);
    }

    const COMMON: &[&str] = &[
        "age",
        "date",
        "etag",
        "host",
        "vary",
        "range",
        "accept",
        "cookie",
        "origin",
        "pragma",
        "server",
        "expires",
        "referer",
        "upgrade",
        "location",
        "connection",
        "keep-alive",
        "set-cookie",
        "user-agent",
        "content-type",
        "x-request-id",
        "accept-ranges",
        "authorization",
        "cache-control",
        "if-none-match",
        "last-modified",
        "content-length",
        "accept-encoding",
        "accept-language",
        "x-forwarded-for",
        "content-encoding",
        "if-modified-since",
        "transfer-encoding",
    ];

    #[test]
    fn common_names_in_any_case_are_the_standard_ones() {
        for name in COMMON {
            let mixed: String = name
                .chars()
                .enumerate()
                .map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c })
                .collect();
            for form in [name.to_string(), name.to_ascii_uppercase(), mixed] {
                let fast = common_name(form.as_bytes());
                assert_eq!(
                    fast.as_ref(),
                    Some(&HeaderName::from_bytes(form.as_bytes()).unwrap()),
                    "{form}"
                );
                assert_eq!(fast.unwrap().as_str(), *name);
            }
        }
    }

    #[test]
    fn common_name_matches_nothing_else() {
        // Every token byte in every position of every listed name: a match must be
        // the same field as the general parser reads.
        let tchars: Vec<u8> = (0x21u8..0x7f)
            .filter(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
            .collect();
        for name in COMMON {
            for at in 0..name.len() {
                for &b in &tchars {
                    let mut v = name.as_bytes().to_vec();
                    v[at] = b;
                    if let Some(fast) = common_name(&v) {
                        assert_eq!(
                            fast,
                            HeaderName::from_bytes(&v).unwrap(),
                            "{}",
                            String::from_utf8_lossy(&v)
                        );
                    }
                }
            }
            // One byte short or long.
            assert_eq!(common_name(&name.as_bytes()[1..]), None);
            assert_eq!(common_name(format!("{name}s").as_bytes()), None);
        }
        assert_eq!(common_name(b""), None);
        assert_eq!(common_name(b"x-custom"), None);
        assert_eq!(common_name(b"content_length"), None);
    }
}
