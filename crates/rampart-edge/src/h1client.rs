//! Rampart's own HTTP/1.1 client for the common request: a GET or HEAD with no body
//! and no upgrade, to a plain-HTTP backend, on a pooled connection.
//!
//! hyper's client runs each connection as its own task and hands every request and
//! response across channels to it: for a proxied 1 KiB GET, callgrind counted about
//! 16k instructions on the client side (the connection task, the dispatch channels
//! and the response parse). Here the request's own task writes the head, reads the
//! response with `httparse` and streams the body, and the connection goes back to
//! the pool ([`crate::h1pool`]) when the body's last byte is read. Everything else
//! (request bodies, upgrades, TLS and HTTP/2 backends) still goes through hyper.
//!
//! For the lean server, response fields no stage reads or sets can stay the lines
//! they came in ([`Passthrough`]), copied to the client whole.
//!
//! Response framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304;
//! chunked when `Transfer-Encoding` ends in `chunked` (trailers are passed on);
//! until close for another transfer coding or no length; otherwise
//! `Content-Length`, whose copies must agree. A connection is reused only after a
//! complete HTTP/1.1 message with nothing after it and no `Connection: close`.

use crate::headers::{RequestId, Span, X_REQUEST_ID};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head accepted (hyper's default read buffer limit).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// The most response header fields (hyper's default).
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line and the largest trailer section: the framing
/// guard's bounds for request bodies, the same for responses.
const MAX_CHUNK_LINE: usize = crate::security::guard::MAX_CHUNK_LINE as usize;
const MAX_TRAILERS: usize = crate::security::guard::MAX_TRAILERS as usize;
/// Room for the fields the pipeline adds to a response (`Via`, `x-request-id`, the
/// explanation headers).
const ADDED_FIELDS: usize = 4;
/// How much room a read asks for.
const READ_SIZE: usize = 16 * 1024;

/// A response that breaks HTTP/1.1 (502, `UPSTREAM_INVALID_RESPONSE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidResponse(pub &'static str);

impl std::fmt::Display for InvalidResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid upstream response: {}", self.0)
    }
}

impl std::error::Error for InvalidResponse {}

/// One upstream connection and what has been read from it but not yet used.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// Served a response before (from the pool): a close before any response byte
    /// means the upstream had already closed it, and the request may be sent again.
    reused: bool,
    /// When it went idle in the pool.
    pub(crate) since: Instant,
}

impl Conn {
    /// Boxed for its whole life: it moves from the pool to a request, into the
    /// response body and back, and a pointer is cheaper to move than the connection.
    pub fn new(stream: TcpStream) -> Box<Conn> {
        Box::new(Conn {
            stream,
            buf: BytesMut::new(),
            reused: false,
            since: Instant::now(),
        })
    }

    /// Whether a pooled connection can take a request: the upstream has not closed
    /// it or sent anything unasked. `try_read` reads only when the reactor saw the
    /// socket become readable since the last read that came up empty, and registers
    /// no waker: checking costs neither a system call nor a lock when all is well.
    pub fn usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        // An EOF, a reset or stray bytes make it unusable; a stale readiness is
        // cleared by the read that finds nothing.
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Whether a request can take this client: GET or HEAD, HTTP/1.1, no body, no upgrade.
pub fn eligible(method: &Method, version: Version, headers: &HeaderMap, has_body: bool) -> bool {
    eligible_without_fields(method, version, has_body)
        && !headers.contains_key(header::UPGRADE)
        && !headers.contains_key(header::CONTENT_LENGTH)
        && !headers.contains_key(header::TRANSFER_ENCODING)
}

/// [`eligible`] for a head known to have no `Upgrade`, `Content-Length` or
/// `Transfer-Encoding` field (one the lean HTTP/1 server read).
pub fn eligible_without_fields(method: &Method, version: Version, has_body: bool) -> bool {
    (method == Method::GET || method == Method::HEAD) && !has_body && version == Version::HTTP_11
}

/// Whether a request with a body held whole (`len` bytes) may go through the own
/// client: HTTP/1.1, no `Upgrade` or `Transfer-Encoding`, and one `Content-Length`
/// that says `len` (the head is sent as it is, with the body behind it).
pub fn eligible_with_body(method: &Method, version: Version, headers: &HeaderMap, len: usize) -> bool {
    version == Version::HTTP_11
        && method != Method::CONNECT
        && !headers.contains_key(header::UPGRADE)
        && !headers.contains_key(header::TRANSFER_ENCODING)
        && headers.get_all(header::CONTENT_LENGTH).iter().count() == 1
        && crate::headers::content_length(headers) == Ok(Some(len as u64))
}

/// The request as it goes on the wire (`target` in origin form): the head with
/// `headers`, then `more`; then `body` (a body held whole, or empty).
pub fn encode<'n, 'v>(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    more: impl Iterator<Item = (&'n HeaderName, &'v [u8])>,
    body: &[u8],
) -> Vec<u8> {
    // Room for typical fields (one pass over the map; a head that needs more grows).
    let mut out = Vec::with_capacity(method.as_str().len() + target.len() + 15 + (headers.len() + 5) * 48 + body.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in headers {
        crate::headers::write_field(&mut out, k, v.as_bytes());
    }
    for (k, v) in more {
        crate::headers::write_field(&mut out, k, v);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Why an exchange got no response.
pub enum Failure {
    /// A pooled connection turned out closed before any response byte: the
    /// request may be sent again on a new connection.
    Stale,
    Io(std::io::Error),
    Invalid(InvalidResponse),
}

/// Send `wire` (an encoded head, and the body if any) on `conn` and read the
/// response head; with `passthrough`, the fields no stage uses stay lines, for the
/// body to carry. `idempotent`: a reused connection that closes after the request
/// went out, before any response, is `Stale` (the request may be sent again);
/// otherwise the upstream may have acted on it, and it is an error.
pub async fn exchange(
    mut conn: Box<Conn>,
    wire: &[u8],
    head_request: bool,
    passthrough: bool,
    idempotent: bool,
) -> Result<(http::response::Parts, Body), Failure> {
    if let Err(e) = conn.stream.write_all(wire).await {
        return Err(if conn.reused { Failure::Stale } else { Failure::Io(e) });
    }
    let may_resend = conn.reused && idempotent;
    loop {
        match parse_head(&mut conn.buf, head_request, passthrough) {
            Ok(Some(head)) => {
                let body = Body {
                    conn: Some(conn),
                    framing: head.framing,
                    keep_alive: head.keep_alive,
                    home: None,
                    passthrough: head.passthrough,
                };
                return Ok((head.parts, body));
            }
            Ok(None) => {}
            Err(e) => return Err(Failure::Invalid(e)),
        }
        if conn.buf.len() >= MAX_HEAD {
            return Err(Failure::Invalid(InvalidResponse("response head too large")));
        }
        conn.buf.reserve(READ_SIZE);
        let nothing_yet = conn.buf.is_empty();
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) if may_resend && nothing_yet => return Err(Failure::Stale),
            Ok(0) => {
                return Err(Failure::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "upstream closed the connection before a complete response head",
                )));
            }
            Ok(_) => {}
            Err(e) if may_resend && nothing_yet && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(Failure::Stale);
            }
            Err(e) => return Err(Failure::Io(e)),
        }
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a size (how many read, the value so far).
    Size {
        digits: u8,
        size: u64,
    },
    /// After the size: an extension, up to CR.
    Ext {
        size: u64,
        len: usize,
    },
    /// CR seen after the size line; LF next.
    SizeLf {
        size: u64,
    },
    Data(u64),
    /// A chunk's data ended; CR LF next.
    DataCr,
    DataLf,
    /// After the last chunk: trailer fields, then the empty line.
    Trailers,
    /// The trailer section was passed on; the message has ended.
    End,
}

/// A parsed response head.
struct Head {
    parts: http::response::Parts,
    framing: Framing,
    keep_alive: bool,
    passthrough: Option<Box<Passthrough>>,
}

/// Parse a response head from the front of `buf`, skipping interim (1xx) responses.
/// `None`: not all of it is here yet. The head's bytes are taken out of `buf`.
/// With `passthrough`, the fields the pipeline neither reads nor sets are left out
/// of the map and kept as the lines they came in (see [`Passthrough`]).
fn parse_head(buf: &mut BytesMut, head_request: bool, passthrough: bool) -> Result<Option<Head>, InvalidResponse> {
    loop {
        // Uninitialised slots: parsing writes only the ones it fills.
        let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut res, buf, &mut slots) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(InvalidResponse("too many header fields")),
            Err(_) => return Err(InvalidResponse("malformed response head")),
        };
        let code = res.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| InvalidResponse("bad status code"))?;
        let version = if res.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Interim responses (100 Continue, 103 Early Hints) are not relayed.
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        // Field values are views into the head's one buffer, not copies.
        let mut slots = crate::headers::SpanSlots::<MAX_HEADERS>::for_fields(res.headers.len());
        let spans = slots.slots();
        crate::headers::spans(buf, res.headers, spans);
        let mut sorted = sort_fields(buf, res.headers, spans, passthrough);
        if sorted.names_others {
            // A `Connection` naming other fields: those are removed by name from the
            // map, so every field goes there (the spans are found again: sorting
            // moved them).
            crate::headers::spans(buf, res.headers, spans);
            sorted = sort_fields(buf, res.headers, spans, false);
        }
        // A held `Content-Length` that does not frame this body (or meets a
        // `Transfer-Encoding`) goes to the map after all, for the checks there.
        let length_frames = !(head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || sorted.te);
        let mut held = None;
        if let Some((span, n)) = sorted.held_length {
            match spans.get_mut(sorted.in_map) {
                Some(slot) if !length_frames => {
                    *slot = span;
                    sorted.in_map += 1;
                }
                _ => held = Some(n),
            }
        }
        let head = buf.split_to(len).freeze();
        // Room for the proxy's fields, unless they ride with passed lines: a map left
        // empty then costs no allocation.
        let room = if sorted.n_runs > 0 { 0 } else { ADDED_FIELDS };
        let headers = crate::headers::header_map(&head, &spans[..sorted.in_map], room)
            .ok_or(InvalidResponse("bad header field"))?;
        let (framing, keep_alive) = framing(status, version, sorted.close, &headers, head_request, held)?;
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        // Boxed: the body moves several times on its way to the client, and a
        // pointer is cheaper to copy than the lines' record.
        let passthrough = (sorted.n_runs > 0).then(|| {
            Box::new(Passthrough {
                head,
                runs: sorted.runs,
                len: sorted.n_runs,
                date: sorted.date,
                via: None,
                request_id: None,
            })
        });
        return Ok(Some(Head {
            parts,
            framing,
            keep_alive,
            passthrough,
        }));
    }
}

/// How [`sort_fields`] sorted a head's fields.
struct Sorted {
    /// How many spans, at the front, go into the map.
    in_map: usize,
    /// A `Connection` field says `close`.
    close: bool,
    /// A `Connection` field names fields other than itself and `Keep-Alive`.
    names_others: bool,
    /// The passed-through lines' runs, how many there are, and whether a `Date` is
    /// among them.
    runs: [(u32, u32); RUNS],
    n_runs: usize,
    date: bool,
    /// With `passthrough`, a lone valid `Content-Length` is held out of the map: its
    /// span and value. (Its length frames the body; the client's encoder writes the
    /// field from the body's exact size.)
    held_length: Option<(Span, u64)>,
    /// A `Transfer-Encoding` field is among them.
    te: bool,
}

/// Sort a head's fields: `Connection` fields that say only `close` or `keep-alive`,
/// and `Keep-Alive` fields, are read here and left out: they concern this
/// connection alone (RFC 9112 §9.6), and the proxy would remove them again. A
/// `Connection` naming other fields stays, for the hop-by-hop removal to read. With
/// `passthrough`, fields the pipeline has no use for become runs of lines, as long as
/// there are runs to spare; the rest are moved to the front of `spans`, for the map.
fn sort_fields(head: &[u8], fields: &[httparse::Header<'_>], spans: &mut [Span], passthrough: bool) -> Sorted {
    let mut sorted = Sorted {
        in_map: 0,
        close: false,
        names_others: false,
        runs: [(0, 0); RUNS],
        n_runs: 0,
        date: false,
        held_length: None,
        te: false,
    };
    let mut lengths = 0;
    for (i, field) in fields.iter().enumerate() {
        let name = field.name.as_bytes();
        let class = classify(name);
        match class {
            Class::ContentLength if passthrough => {
                lengths += 1;
                if lengths == 1
                    && let Some(n) = crate::headers::length_value(field.value)
                {
                    sorted.held_length = Some((spans[i], n));
                    continue;
                }
                // Another one: every copy goes to the map, for the checks there.
                // (The held one's slot is behind `i`: `in_map < i`.)
                if let Some((span, _)) = sorted.held_length.take() {
                    spans[sorted.in_map] = span;
                    sorted.in_map += 1;
                }
            }
            Class::TransferEncoding => sorted.te = true,
            _ => {}
        }
        let this_hop_only = match class {
            Class::Connection => {
                let mut only = true;
                for token in crate::headers::value_elements(field.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        sorted.close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                        only = false;
                    }
                }
                sorted.names_others |= !only;
                only
            }
            Class::KeepAlive => true,
            _ => false,
        };
        if this_hop_only {
            continue;
        }
        if passthrough
            && matches!(class, Class::Other | Class::Date)
            && let Some((from, to)) = line_of(head, spans[i])
        {
            // The line follows the last run's: one run, copied in one go.
            let n = sorted.n_runs;
            let follows = n > 0 && sorted.runs[n - 1].1 == from;
            if follows || n < RUNS {
                if follows {
                    sorted.runs[n - 1].1 = to;
                } else {
                    sorted.runs[n] = (from, to);
                    sorted.n_runs += 1;
                }
                sorted.date |= class == Class::Date;
                continue;
            }
        }
        spans[sorted.in_map] = spans[i];
        sorted.in_map += 1;
    }
    sorted
}

/// What a response field is to [`sort_fields`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Connection,
    KeepAlive,
    Date,
    ContentLength,
    TransferEncoding,
    /// One the pipeline reads or sets (framing, hop-by-hop, `Via`, `x-request-id`,
    /// the rate-limit fields): always in the map.
    Pipeline,
    Other,
}

/// The class of field `name` (a token, as httparse checks names to be), in any case.
fn classify(name: &[u8]) -> Class {
    let Some(&first) = name.first() else {
        return Class::Other;
    };
    let is = |lower: &[u8]| crate::headers::eq_folded(name, lower);
    match (name.len(), first | 0x20) {
        (4, b'd') if is(b"date") => Class::Date,
        (10, b'c') if is(b"connection") => Class::Connection,
        (10, b'k') if is(b"keep-alive") => Class::KeepAlive,
        (2, b't') if is(b"te") => Class::Pipeline,
        (3, b'v') if is(b"via") => Class::Pipeline,
        (7, b'u') if is(b"upgrade") => Class::Pipeline,
        (7, b't') if is(b"trailer") => Class::Pipeline,
        (9, b'r') if is(b"ratelimit") => Class::Pipeline,
        (12, b'x') if is(b"x-request-id") => Class::Pipeline,
        (14, b'c') if is(b"content-length") => Class::ContentLength,
        (16, b'p') if is(b"proxy-connection") => Class::Pipeline,
        (16, b'r') if is(b"ratelimit-policy") => Class::Pipeline,
        (17, b't') if is(b"transfer-encoding") => Class::TransferEncoding,
        _ => Class::Other,
    }
}

/// The whole line of a field (`Name: value` to its CRLF) as a range of `head`, or
/// `None` when it does not end in CRLF (a bare LF is not passed on) or has an empty
/// value (httparse's slice for it need not point into the head).
fn line_of(head: &[u8], (name_at, name_len, value_at, value_len): Span) -> Option<(u32, u32)> {
    if value_len == 0 || value_at < name_at.saturating_add(name_len) {
        return None;
    }
    let value_end = value_at as usize + value_len as usize;
    // After the value: CR LF, or optional white space before it.
    let after = head.get(value_end..)?;
    let lf = if after.starts_with(b"\r\n") {
        value_end + 1
    } else {
        let lf = value_end + after.iter().take(64).position(|&b| b == b'\n')?;
        if lf == value_end || head.get(lf - 1) != Some(&b'\r') {
            return None;
        }
        lf
    };
    Some((name_at, u32::try_from(lf + 1).ok()?))
}

/// Runs of a response's header lines kept for the client as they came.
const RUNS: usize = 4;

/// Header fields passed to the client as the upstream sent them: whole lines of its
/// head, in runs, each copied in one go (the map would parse, hash and store each
/// one, and the response encoder write it again piece by piece). Only the lean
/// HTTP/1 server asks for them, for responses that no stage but framing touches.
///
/// The proxy's own fields can ride along ([`Passthrough::add_own`]), written after
/// the lines, when the upstream sent none of the same name.
pub struct Passthrough {
    head: Bytes,
    runs: [(u32, u32); RUNS],
    len: usize,
    /// A `Date` field is among them.
    pub date: bool,
    /// Added after the lines: `Via` and `x-request-id`.
    via: Option<HeaderValue>,
    request_id: Option<RequestId>,
}

impl Passthrough {
    /// Append the lines, each ending in CRLF, then the added fields.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for &(from, to) in self.runs.iter().take(self.len) {
            if let Some(lines) = self.head.get(from as usize..to as usize) {
                out.extend_from_slice(lines);
            }
        }
        if let Some(v) = &self.via {
            crate::headers::write_field(out, &header::VIA, v.as_bytes());
        }
        if let Some(id) = &self.request_id {
            crate::headers::write_field(out, &X_REQUEST_ID, id.as_bytes());
        }
    }

    /// Write the proxy's `Via` (when given) and `x-request-id` after the lines.
    pub fn add_own(&mut self, via: Option<HeaderValue>, request_id: RequestId) {
        self.via = via;
        self.request_id = Some(request_id);
    }
}

impl std::fmt::Debug for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passthrough")
            .field("runs", &&self.runs[..self.len.min(RUNS)])
            .field("date", &self.date)
            .finish()
    }
}

/// The body's framing and whether the connection may carry another request.
/// `close`: a `Connection` field of the response said `close`.
/// `held`: the value of a `Content-Length` kept out of `h` ([`sort_fields`]).
fn framing(
    status: StatusCode,
    version: Version,
    close: bool,
    h: &HeaderMap,
    head_request: bool,
    held: Option<u64>,
) -> Result<(Framing, bool), InvalidResponse> {
    let close = close || version != Version::HTTP_11;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok((Framing::Done, false));
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, !close));
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        let chunked = h
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        // With both framings the connection is not trusted with another message.
        let both = h.contains_key(header::CONTENT_LENGTH);
        return Ok(if chunked {
            (Framing::Chunked(Chunk::Size { digits: 0, size: 0 }), !close && !both)
        } else {
            (Framing::Close, false)
        });
    }
    let length = match held {
        Some(n) => Some(n),
        None => crate::headers::content_length(h).map_err(InvalidResponse)?,
    };
    Ok(match length {
        Some(0) => (Framing::Done, !close),
        Some(n) => (Framing::Length(n), !close),
        None => (Framing::Close, false),
    })
}

/// What the decoder found in the buffer.
enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    NeedMore,
}

impl Framing {
    /// Take the next piece of the body from the front of `buf`.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, InvalidResponse> {
        loop {
            match self {
                Framing::Done => return Ok(Decoded::End),
                Framing::Length(rem) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(*rem).unwrap_or(usize::MAX).min(buf.len());
                    *rem -= take as u64;
                    if *rem == 0 {
                        *self = Framing::Done;
                    }
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Framing::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Framing::Chunked(c) => match decode_chunk(c, buf)? {
                    Some(Decoded::End) => {
                        *self = Framing::Done;
                        return Ok(Decoded::End);
                    }
                    Some(d) => return Ok(d),
                    None => continue,
                },
            }
        }
    }
}

/// One step of the chunked decoder: `Some` when it has something to say, `None`
/// when it moved on and should be called again.
fn decode_chunk(c: &mut Chunk, buf: &mut BytesMut) -> Result<Option<Decoded>, InvalidResponse> {
    if *c == Chunk::End {
        return Ok(Some(Decoded::End));
    }
    if buf.is_empty() {
        return Ok(Some(Decoded::NeedMore));
    }
    match *c {
        Chunk::Size { digits, size } => {
            let b = buf[0];
            let d = match b {
                b'0'..=b'9' => Some(b - b'0'),
                b'a'..=b'f' => Some(b - b'a' + 10),
                b'A'..=b'F' => Some(b - b'A' + 10),
                _ => None,
            };
            match d {
                Some(d) => {
                    if digits >= 15 {
                        return Err(InvalidResponse("chunk size too large"));
                    }
                    *c = Chunk::Size {
                        digits: digits + 1,
                        size: size * 16 + u64::from(d),
                    };
                }
                None if digits == 0 => return Err(InvalidResponse("bad chunk size")),
                None if b == b'\r' => *c = Chunk::SizeLf { size },
                None if b == b';' || b == b' ' || b == b'\t' => *c = Chunk::Ext { size, len: 0 },
                None => return Err(InvalidResponse("bad chunk size")),
            }
            buf.advance(1);
        }
        Chunk::Ext { size, len } => {
            // Extensions are ignored; only their length and characters are checked.
            let end = buf.iter().position(|b| *b == b'\r' || *b == b'\n');
            let used = end.unwrap_or(buf.len());
            if len + used > MAX_CHUNK_LINE {
                return Err(InvalidResponse("chunk extension too long"));
            }
            match end {
                Some(i) if buf[i] == b'\r' => {
                    buf.advance(i + 1);
                    *c = Chunk::SizeLf { size };
                }
                Some(_) => return Err(InvalidResponse("bare LF in a chunk size line")),
                None => {
                    buf.advance(used);
                    *c = Chunk::Ext { size, len: len + used };
                }
            }
        }
        Chunk::SizeLf { size } => {
            if buf[0] != b'\n' {
                return Err(InvalidResponse("bad chunk size line"));
            }
            buf.advance(1);
            *c = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
        }
        Chunk::Data(rem) => {
            let take = usize::try_from(rem).unwrap_or(usize::MAX).min(buf.len());
            let left = rem - take as u64;
            *c = if left == 0 { Chunk::DataCr } else { Chunk::Data(left) };
            return Ok(Some(Decoded::Data(buf.split_to(take).freeze())));
        }
        Chunk::End => return Ok(Some(Decoded::End)),
        Chunk::DataCr | Chunk::DataLf => {
            let want = if *c == Chunk::DataCr { b'\r' } else { b'\n' };
            if buf[0] != want {
                return Err(InvalidResponse("chunk data not followed by CRLF"));
            }
            buf.advance(1);
            *c = if want == b'\r' {
                Chunk::DataLf
            } else {
                Chunk::Size { digits: 0, size: 0 }
            };
        }
        Chunk::Trailers => {
            if buf.len() >= 2 && &buf[..2] == b"\r\n" {
                buf.advance(2);
                return Ok(Some(Decoded::End));
            }
            if buf.len() < 2 {
                return Ok(Some(Decoded::NeedMore));
            }
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if buf.len() > MAX_TRAILERS {
                    return Err(InvalidResponse("trailer section too large"));
                }
                return Ok(Some(Decoded::NeedMore));
            };
            let section = buf.split_to(end + 4);
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let fields = match httparse::parse_headers(&section, &mut slots) {
                Ok(httparse::Status::Complete((_, fields))) => fields,
                _ => return Err(InvalidResponse("malformed trailer section")),
            };
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for f in fields {
                let name =
                    HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| InvalidResponse("bad trailer name"))?;
                let value = HeaderValue::from_bytes(f.value).map_err(|_| InvalidResponse("bad trailer value"))?;
                trailers.append(name, value);
            }
            // The message ends with the section; `End` comes on the next call.
            *c = Chunk::End;
            return Ok(Some(Decoded::Trailers(trailers)));
        }
    }
    Ok(None)
}

/// Where a connection goes back when its response has been read whole.
pub type Home = (Arc<crate::upstream::Pool>, usize);

/// A response body read straight from the upstream connection.
pub struct Body {
    conn: Option<Box<Conn>>,
    framing: Framing,
    keep_alive: bool,
    home: Option<Home>,
    /// The head's fields kept as lines, for the response to the client.
    passthrough: Option<Box<Passthrough>>,
}

impl Body {
    /// The passed-through header lines, for the one who writes the response head.
    pub fn take_passthrough(&mut self) -> Option<Box<Passthrough>> {
        self.passthrough.take()
    }

    /// The passed-through header lines, to add to.
    pub fn passthrough_mut(&mut self) -> Option<&mut Passthrough> {
        self.passthrough.as_deref_mut()
    }

    /// Return the connection to `home`'s idle list once the body is read whole
    /// (at once, when there is no body).
    pub fn returning_to(mut self, home: Home) -> Body {
        self.home = Some(home);
        if self.framing == Framing::Done {
            self.release();
        }
        self
    }

    /// The message is read whole: pool the connection if it can carry another.
    fn release(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        if !self.keep_alive || !conn.buf.is_empty() {
            return;
        }
        if let Some((pool, index)) = self.home.take()
            && let Some(h1) = &pool.h1
        {
            conn.reused = true;
            conn.since = Instant::now();
            h1.put_own(index, conn);
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing.decode(&mut conn.buf) {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Ok(Decoded::Data(d)) => {
                    if this.framing == Framing::Done {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Decoded::Trailers(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Ok(Decoded::End) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
            }
            conn.buf.reserve(READ_SIZE);
            let read = {
                let mut fut = std::pin::pin!(conn.stream.read_buf(&mut conn.buf));
                fut.as_mut().poll(cx)
            };
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if this.framing == Framing::Close {
                        this.framing = Framing::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    this.conn = None;
                    let e = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection inside a response body",
                    );
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn head(text: &str, head_request: bool) -> (http::response::Parts, Framing, bool, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        let h = parse_head(&mut buf, head_request, false).unwrap().unwrap();
        assert!(h.passthrough.is_none());
        (h.parts, h.framing, h.keep_alive, buf)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (p, f, k, rest) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello", false);
        assert_eq!(p.status, 200);
        assert_eq!(p.headers["x-a"], "b");
        assert_eq!((f, k), (Framing::Length(5), true));
        assert_eq!(&rest[..], b"hello");
        let (_, f, k, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!((f, k), (Framing::Done, true), "HEAD: no body");
        let (_, f, k, _) = head("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", false);
        assert_eq!((f, k), (Framing::Done, true));
        let (_, f, k, _) = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false);
        assert!(matches!(f, Framing::Chunked(_)) && k);
        let (_, f, k, _) = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!((f, k), (Framing::Close, false));
        let (_, f, k, _) = head("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((f, k), (Framing::Close, false));
        let (_, f, k, _) = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n",
            false,
        );
        assert_eq!((f, k), (Framing::Length(3), false));
        let (p, f, k, _) = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n",
            false,
        );
        assert_eq!((f, k), (Framing::Length(3), true));
        assert!(!p.headers.contains_key(header::CONNECTION) && !p.headers.contains_key("keep-alive"));
        assert_eq!(p.headers.len(), 1, "this connection's own fields are left out");
        let (p, f, k, _) = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: x-a\r\nconnection: CLOSE\r\nX-A: 1\r\n\r\n",
            false,
        );
        assert_eq!(
            (f, k),
            (Framing::Length(3), false),
            "close read from any Connection line"
        );
        assert_eq!(
            p.headers.get_all(header::CONNECTION).iter().count(),
            1,
            "the one naming a field stays"
        );
        let (p, f, k, _) = head("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", false);
        assert_eq!((p.version, f, k), (Version::HTTP_10, Framing::Length(3), false));
        let (_, f, _, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", false);
        assert_eq!(f, Framing::Length(3));
        let (p, _, _, rest) = head(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            false,
        );
        assert_eq!(p.status, 204, "interim responses skipped");
        assert!(rest.is_empty());
    }

    #[test]
    fn bad_heads_are_refused_and_partial_ones_wait() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(bad.as_bytes());
            assert!(parse_head(&mut buf, false, false).is_err(), "{bad:?}");
        }
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(matches!(parse_head(&mut buf, false, false), Ok(None)));
        // Field values keep obs-text and tabs; control characters are refused.
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-A: caf\xc3\xa9\tb\r\n\r\n"[..]);
        let p = parse_head(&mut buf, false, false).unwrap().unwrap().parts;
        assert_eq!(p.headers["x-a"].as_bytes(), b"caf\xc3\xa9\tb");
        for bad in [&b"X-A: a\x7fb"[..], b"X-A: a\x01b", b"X-A: a\rb"] {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            head.extend_from_slice(bad);
            head.extend_from_slice(b"\r\n\r\n");
            let mut buf = BytesMut::from(&head[..]);
            assert!(
                parse_head(&mut buf, false, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Parse `text` with passthrough: the map's fields, the passed lines, and their
    /// `date` flag. A `Content-Length` held out of the map is added to the lines as
    /// the lean server writes it (from the framing: these are all 200s to a GET).
    fn passed(text: &str) -> (HeaderMap, String, bool, Framing) {
        let mut buf = BytesMut::from(text.as_bytes());
        let h = parse_head(&mut buf, false, true).unwrap().unwrap();
        let mut out = Vec::new();
        let date = h.passthrough.as_ref().is_some_and(|p| p.date);
        if let Some(p) = &h.passthrough {
            p.write_to(&mut out);
        }
        let mut out = String::from_utf8(out).unwrap();
        if !h.parts.headers.contains_key(header::CONTENT_LENGTH) {
            match h.framing {
                Framing::Length(n) => out.push_str(&format!("content-length: {n}\r\n")),
                Framing::Done => out.push_str("content-length: 0\r\n"),
                _ => {}
            }
        }
        (h.parts.headers, out, date, h.framing)
    }

    /// Every field as (lower-case name, value), sorted: from a map, or from lines.
    fn fields_of(map: &HeaderMap, lines: &str) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = map
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
            .collect();
        for line in lines.split_terminator("\r\n") {
            let (k, v) = line.split_once(':').unwrap();
            all.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        all.sort();
        all
    }

    #[test]
    fn unused_fields_pass_as_the_lines_they_came_in() {
        let (map, lines, date, f) = passed(
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 10:00:00 GMT\r\nContent-Type: text/html\r\n\
             Content-Length: 5\r\nLast-Modified: x\r\nConnection: keep-alive\r\nETag: \"e\"\r\nAccept-Ranges: bytes  \r\n\r\nhello",
        );
        assert_eq!(f, Framing::Length(5));
        assert!(map.is_empty(), "the length frames the body, out of the map: {map:?}");
        assert_eq!(
            lines,
            "Server: nginx\r\nDate: Mon, 23 Nov 2026 10:00:00 GMT\r\nContent-Type: text/html\r\n\
             Last-Modified: x\r\nETag: \"e\"\r\nAccept-Ranges: bytes  \r\ncontent-length: 5\r\n",
            "as they came, letter case and white space too"
        );
        assert!(date);

        // What the pipeline reads or sets stays in the map.
        let (map, lines, date, _) = passed(
            "HTTP/1.1 200 OK\r\nVia: 1.1 a\r\nX-Request-Id: r\r\nTransfer-Encoding: chunked\r\nTrailer: x\r\n\
             RateLimit: r\r\nRateLimit-Policy: p\r\nUpgrade: u\r\nTE: t\r\nProxy-Connection: p\r\nX-A: 1\r\n\r\n",
        );
        assert_eq!(map.len(), 9, "{map:?}");
        assert_eq!((lines.as_str(), date), ("X-A: 1\r\n", false));

        // A `Connection` naming a field: all in the map, for the removal by name.
        let (map, lines, _, _) =
            passed("HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: x-a\r\nX-B: 2\r\nContent-Length: 0\r\n\r\n");
        assert_eq!((map.len(), lines.as_str()), (4, ""));

        // Lines without CR, and empty values, go through the map.
        let (map, lines, _, _) = passed("HTTP/1.1 200 OK\nX-A: 1\nX-B:\nContent-Length: 0\n\n");
        assert_eq!((map.len(), lines.as_str()), (2, "content-length: 0\r\n"));
        let (map, lines, _, _) = passed("HTTP/1.1 200 OK\r\nX-B:\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!((map.len(), lines.as_str()), (1, "X-A: 1\r\ncontent-length: 0\r\n"));

        // A length held out of the map only where it frames the body alone: with
        // `Transfer-Encoding`, twice, or unreadable, it stays for the checks there.
        let (map, _, _, f) = passed("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(map[header::CONTENT_LENGTH], "3");
        assert!(matches!(f, Framing::Chunked(_)));
        let (map, _, _, f) = passed("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            (map.get_all(header::CONTENT_LENGTH).iter().count(), f),
            (2, Framing::Length(3))
        );
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..]);
        assert!(parse_head(&mut buf, false, true).is_err(), "conflicting lengths");
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..]);
        assert!(parse_head(&mut buf, false, true).is_err(), "a bad length");
        for (text, head_request) in [
            ("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", false),
            ("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true),
        ] {
            let mut buf = BytesMut::from(text.as_bytes());
            let h = parse_head(&mut buf, head_request, true).unwrap().unwrap();
            assert!(h.parts.headers.contains_key(header::CONTENT_LENGTH), "{text:?}");
            assert_eq!(h.framing, Framing::Done);
        }
    }

    #[test]
    fn passed_lines_and_the_map_hold_every_field_once() {
        // More separate runs than there is room for: the rest go to the map.
        let text = "HTTP/1.1 200 OK\r\nA: 1\r\nVia: v1\r\nB: 2\r\nVia: v2\r\nC: 3\r\nC: 3b\r\nVia: v3\r\nD: 4\r\n\
                    Via: v4\r\nE: 5\r\nF: 6\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n";
        let (map, lines, _, _) = passed(text);
        assert_eq!(lines, "A: 1\r\nB: 2\r\nC: 3\r\nC: 3b\r\nD: 4\r\ncontent-length: 0\r\n");
        let mut buf = BytesMut::from(text.as_bytes());
        let whole = parse_head(&mut buf, false, false).unwrap().unwrap().parts.headers;
        assert_eq!(fields_of(&map, &lines), fields_of(&whole, ""));
        assert_eq!(map.get_all("via").iter().count(), 4, "order within a name kept");
        assert_eq!(map.get_all("via").iter().next_back().unwrap(), "v4");
        // Past the small array of spans (16): the same.
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..20 {
            text.push_str(&format!("X-{i}: {i}\r\nVia: {i}\r\n"));
        }
        text.push_str("Content-Length: 2\r\n\r\n");
        let (map, lines, _, _) = passed(&text);
        let mut buf = BytesMut::from(text.as_bytes());
        let whole = parse_head(&mut buf, false, false).unwrap().unwrap().parts.headers;
        assert_eq!(whole.len(), 41);
        assert_eq!(fields_of(&map, &lines), fields_of(&whole, ""));
        // Every mix of passed and kept fields, the same way.
        let kinds = [
            "X-P: p",
            "Via: v",
            "Date: d",
            "Content-Length: 0",
            "Connection: close",
            "X-Q:  q ",
        ];
        for mask in 0..(6usize.pow(4)) {
            let mut text = String::from("HTTP/1.1 200 OK\r\n");
            let mut m = mask;
            for _ in 0..4 {
                text.push_str(kinds[m % 6]);
                text.push_str("\r\n");
                m /= 6;
            }
            text.push_str("\r\n");
            let (map, lines, date, _) = passed(&text);
            let mut buf = BytesMut::from(text.as_bytes());
            let whole = parse_head(&mut buf, false, false).unwrap().unwrap().parts.headers;
            assert_eq!(fields_of(&map, &lines), fields_of(&whole, ""), "{text:?}");
            assert_eq!(date, lines.contains("Date:"), "{text:?}");
        }
    }

    /// Decode a whole body fed in pieces of `step` bytes: (data, trailers, ended).
    fn decode_all(
        mut f: Framing,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>, bool), InvalidResponse> {
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match f.decode(&mut buf)? {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((data, trailers, true)),
                Decoded::NeedMore => {
                    if fed == wire.len() {
                        return Ok((data, trailers, false));
                    }
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_at_every_split() {
        let wire = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Sum: 9\r\n\r\n";
        for step in 1..=wire.len() {
            let (data, trailers, ended) =
                decode_all(Framing::Chunked(Chunk::Size { digits: 0, size: 0 }), wire, step).unwrap();
            assert_eq!(data, b"hello0123456789", "step {step}");
            assert_eq!(trailers.unwrap()["x-sum"], "9");
            assert!(ended);
        }
        let plain = b"3\r\nabc\r\n0\r\n\r\n";
        for step in 1..=plain.len() {
            let (data, trailers, ended) =
                decode_all(Framing::Chunked(Chunk::Size { digits: 0, size: 0 }), plain, step).unwrap();
            assert_eq!((data.as_slice(), trailers.is_none(), ended), (&b"abc"[..], true, true));
        }
        for bad in [
            &b"x\r\n"[..],
            b"3\nabc\r\n",
            b"3\r\nabcd\r\n",
            b"fffffffffffffffff\r\n",
            b"3\r\nabc\n0\r\n\r\n",
        ] {
            assert!(
                decode_all(Framing::Chunked(Chunk::Size { digits: 0, size: 0 }), bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let (data, _, ended) = decode_all(Framing::Length(5), b"helloEXTRA", 3).unwrap();
        // What follows the body stays in the buffer (and keeps the connection out of the pool).
        assert_eq!((data.as_slice(), ended), (&b"hello"[..], true));
    }

    #[test]
    fn only_simple_requests_are_eligible() {
        let ok = |r: &Request<()>, body: bool| eligible(r.method(), r.version(), r.headers(), body);
        let get = Request::get("/a?b").body(()).unwrap();
        assert!(ok(&get, false));
        assert!(!ok(&get, true));
        let post = Request::post("/").body(()).unwrap();
        assert!(!ok(&post, false));
        let ws = Request::get("/").header("upgrade", "websocket").body(()).unwrap();
        assert!(!ok(&ws, false));
        let req = Request::get("/p?q=1")
            .header("host", "h")
            .header("x-a", "1")
            .body(())
            .unwrap();
        assert_eq!(
            encode(req.method(), "/p?q=1", req.headers(), std::iter::empty(), b""),
            b"GET /p?q=1 HTTP/1.1\r\nhost: h\r\nx-a: 1\r\n\r\n"
        );
    }

    #[test]
    fn whole_bodies_need_one_matching_length() {
        let ok = |r: &Request<()>, len: usize| eligible_with_body(r.method(), r.version(), r.headers(), len);
        let post = |fields: &[(&str, &str)]| {
            let mut b = Request::post("/");
            for (k, v) in fields {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        assert!(ok(&post(&[("content-length", "5")]), 5));
        assert!(ok(&post(&[("content-length", "0")]), 0));
        assert!(!ok(&post(&[("content-length", "5")]), 4), "a length that differs");
        assert!(!ok(&post(&[]), 5), "no length");
        assert!(
            !ok(&post(&[("content-length", "5"), ("content-length", "5")]), 5),
            "two fields"
        );
        assert!(!ok(
            &post(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
            5
        ));
        assert!(!ok(&post(&[("content-length", "5"), ("upgrade", "websocket")]), 5));
        let mut h10 = post(&[("content-length", "5")]);
        *h10.version_mut() = Version::HTTP_10;
        assert!(!ok(&h10, 5), "the own client speaks HTTP/1.1");
        let connect = Request::connect("h:443")
            .header("content-length", "5")
            .body(())
            .unwrap();
        assert!(!ok(&connect, 5));
        let req = post(&[("host", "h"), ("content-length", "5")]);
        assert_eq!(
            encode(req.method(), "/", req.headers(), std::iter::empty(), b"hello"),
            b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\nhello"
        );
    }
}
