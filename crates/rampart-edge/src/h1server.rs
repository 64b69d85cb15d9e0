//! Rampart's own HTTP/1.1 server path for the common request: a plain keep-alive
//! request with no upgrade and no body (a GET, a HEAD, a DELETE without content), or
//! a small body (one `Content-Length`, up to [`MAX_BODY`]; a form post, an API
//! call), read whole before the pipeline runs.
//!
//! hyper's server runs a dispatcher per connection that parses every head into its
//! own structures, polls the socket about nine times per request and encodes the
//! response through a general writer: callgrind counted about 10k instructions per
//! proxied GET outside the pipeline. Here the connection's own task reads the head
//! with `httparse` (header values are views into one buffer), calls the pipeline,
//! writes the response head and body itself, and loops.
//!
//! Everything else is hyper's: a head with `Transfer-Encoding`, `Upgrade`, `Expect`,
//! `CONNECT`, more than one `Content-Length` or one that is not plain digits, a body
//! larger than [`MAX_BODY`] or slower than [`BODY_WAIT`], a head httparse refuses or that
//! outgrows the head budget. The connection is *handed off*: hyper gets the socket
//! with the bytes read so far in front of it, serves that request and the framing
//! guard watches it (see `listener::serve_http1`), and the connection comes back
//! here once hyper has been quiet long enough to park it.
//!
//! The response follows hyper's server rules, so the path a request takes does not
//! show: `Content-Length` from the body or its header, else chunked (HTTP/1.1) or
//! until close (HTTP/1.0); no body for HEAD, 1xx, 204 and 304; `Date` added; an
//! HTTP/1.0 client's keep-alive answered with `Connection: keep-alive`, a client's
//! `Connection: close` with the same. Response trailers are not sent (hyper sends
//! them only when a `Trailer` field declares them, which the pipeline removes).

use crate::Shared;
use crate::body::{ClientIn, EdgeBody};
use crate::io::Transport;
use crate::proxy::{self, ConnInfo};
use crate::timer::LazyTimer;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// Header slots on the stack; a head with more fields (and a configured limit above
/// this) goes to hyper.
const MAX_HEADERS: usize = 128;
/// Room for the fields the pipeline adds to a request on its way upstream
/// (`X-Forwarded-For`, `-Proto`, `-Host`, `Via`, `x-request-id`, a cookie's pin).
const ADDED_FIELDS: usize = 6;
/// The longest request body served here: one this size or smaller is read whole
/// (see [`BODY_WAIT`]); a larger one goes to hyper, which streams it.
const MAX_BODY: usize = crate::body::SMALL_BODY;
/// The longest wait for the rest of a small body after its head (or the client
/// body timeout, if shorter); a body slower than that is streamed by hyper. Over a
/// real network a body of a few KiB arrives in several reads.
const BODY_WAIT: Duration = Duration::from_secs(1);
/// The response buffer's first size.
const OUT_CAPACITY: usize = 4 * 1024;
/// How much room a read asks for.
const READ_SIZE: usize = 8 * 1024;
/// Body chunks up to this size are copied behind the head or the chunk line, so a
/// small response is one write; larger ones are written from where they are.
const COPY_LIMIT: usize = 16 * 1024;

/// How serving a connection here ended.
pub(crate) enum Ended<T> {
    /// Quiet at a message boundary for a tick: park the socket until `deadline`.
    Park(T, Instant),
    /// Closed (by either side, a timeout, an error, or shutdown).
    Close,
    /// A request this path does not serve: hyper serves the connection from here,
    /// these bytes first.
    Handoff(T, Vec<u8>),
}

/// What the response needs to know about its request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Asked {
    method: Method,
    version: Version,
    keep_alive: bool,
}

/// A request head read from the front of the buffer.
// Returned once per request and unpacked at once, never stored: boxing the request
// would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// Not all of the head is here yet.
    Partial,
    /// The head is, but not all of its small body: the head and body take this
    /// many bytes. The buffer is as it was.
    BodyPartial(usize),
    Request(Request<ClientIn>, Asked),
    /// For hyper (see the module notes); the buffer is as it was.
    Other,
}

/// Serve requests on `io` (with `read` already read from it) until it parks,
/// closes or needs hyper. `deadline`: when a connection that sends nothing is closed.
pub(crate) async fn serve<T: Transport>(
    shared: &Arc<Shared>,
    info: &Arc<ConnInfo>,
    mut io: T,
    read: Vec<u8>,
    shutdown: &mut watch::Receiver<bool>,
    park_after: Duration,
    deadline: Instant,
) -> Ended<T> {
    let (budget, max_headers, idle, body_wait) = {
        let snap = shared.snapshot.load();
        let s = &snap.validated.config.server;
        (
            crate::listener::head_budget(&snap),
            snap.limits.max_headers,
            s.header_read_timeout.get(),
            s.client_body_timeout.get().min(BODY_WAIT),
        )
    };
    let mut buf = BytesMut::from(&read[..]);
    // Room for a typical head and a small body: grown a step at a time from empty,
    // it was reallocated about eight times on each connection's first response.
    let mut out: Vec<u8> = Vec::with_capacity(OUT_CAPACITY);
    // The parking tick: a connection that started no request for a whole tick,
    // waiting for its next one, is parked.
    // (Lazy timers: polled again only when their registration may have lapsed, and
    // moved to a later deadline without touching tokio's timer until they fire.)
    let mut tick = LazyTimer::new(Instant::now() + park_after);
    // Lent to the pipeline for each request's wait for the upstream's response head:
    // one timer moved from deadline to deadline, not one made and dropped per request
    // (set to a deadline before every use; this one is never waited on).
    let mut upstream_timer = LazyTimer::new(deadline);
    // The configuration, checked per request with a plain load of the current
    // pointer: no reference-count traffic unless a reload replaced it.
    let mut snapshots = arc_swap::Cache::new(&shared.snapshot);
    // When the connection is closed if it sends nothing: the given deadline until a
    // request is served; after that, `idle` from the end of the last response, which
    // the tick works out when it finds the connection quiet (no clock read per request).
    let mut deadline = Some(deadline);
    let mut served: u64 = 0;
    let mut served_at_tick: u64 = 0;
    // When the head being read began to arrive (for the header timeout).
    let mut head_began: Option<Instant> = None;
    // When a small body's head was read, while the rest of the body is awaited.
    let mut body_began: Option<Instant> = None;
    // Shutdown only ever turns the flag on. One `changed` future for the whole
    // serve (one waiter registration, not one per request), and a clone whose
    // `has_changed` is a single atomic load for the checks between requests.
    if *shutdown.borrow() {
        return Ended::Close;
    }
    let stopping = shutdown.clone();
    let mut stop = std::pin::pin!(shutdown.changed());
    // The `changed` future, once polled, keeps this task's waker among the
    // channel's waiters until the flag turns: between requests it is not polled
    // again (that would lock the waiter list), the flag is looked at instead.
    let mut stop_registered = false;
    loop {
        if stopping.has_changed().unwrap_or(true) {
            return Ended::Close;
        }
        let parsed = if buf.is_empty() {
            Parsed::Partial
        } else {
            parse(&mut buf, max_headers.min(MAX_HEADERS))
        };
        let (req, asked) = match parsed {
            Parsed::Request(req, asked) => (req, asked),
            Parsed::Other => return Ended::Handoff(io, buf.to_vec()),
            Parsed::BodyPartial(whole) if whole > budget => return Ended::Handoff(io, buf.to_vec()),
            Parsed::BodyPartial(_) => {
                // The rest of a small body, for a short while (`BODY_WAIT`); one
                // slower than that is handed to hyper, which streams it under the
                // client body timeout.
                let began = *body_began.get_or_insert_with(Instant::now);
                tokio::select! {
                    r = tokio::time::timeout_at(began + body_wait, poll_fn(|cx| io.poll_readable(cx))) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Ended::Close,
                        Err(_) => return Ended::Handoff(io, buf.to_vec()),
                    },
                    _ = stop.as_mut() => return Ended::Close,
                }
                if let Got::End = read_now(&mut io, &mut buf, budget) {
                    return Ended::Close;
                }
                continue;
            }
            Parsed::Partial if buf.len() >= budget => return Ended::Handoff(io, buf.to_vec()),
            Parsed::Partial if buf.is_empty() => {
                // Between requests: wait for the next, park when quiet.
                let woke = poll_fn(|cx| {
                    if let Poll::Ready(r) = io.poll_readable(cx) {
                        return Poll::Ready(Between::Readable(r.is_ok()));
                    }
                    if tick.poll_expired(cx).is_ready() {
                        return Poll::Ready(Between::Tick);
                    }
                    if stop_registered {
                        if stopping.has_changed().unwrap_or(true) {
                            return Poll::Ready(Between::Stop);
                        }
                    } else if stop.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Between::Stop);
                    } else {
                        stop_registered = true;
                    }
                    Poll::Pending
                })
                .await;
                match woke {
                    Between::Readable(true) => {}
                    Between::Readable(false) | Between::Stop => return Ended::Close,
                    Between::Tick => {
                        let now = Instant::now();
                        if served == served_at_tick {
                            // Quiet for a whole tick: the last response ended before it.
                            let deadline = deadline.unwrap_or(now.checked_sub(park_after).unwrap_or(now) + idle);
                            if now >= deadline {
                                return Ended::Close;
                            }
                            return Ended::Park(io, deadline);
                        }
                        served_at_tick = served;
                        tick.set(now + park_after);
                        continue;
                    }
                }
                if let Got::End = read_now(&mut io, &mut buf, budget) {
                    return Ended::Close;
                }
                continue;
            }
            Parsed::Partial => {
                // Part of a head: the rest within the header timeout.
                let began = *head_began.get_or_insert_with(Instant::now);
                tokio::select! {
                    r = tokio::time::timeout_at(began + idle, poll_fn(|cx| io.poll_readable(cx))) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Ended::Close,
                        Err(_) => {
                            tracing::debug!("request head not complete in time: closed");
                            return Ended::Close;
                        }
                    },
                    _ = stop.as_mut() => return Ended::Close,
                }
                if let Got::End = read_now(&mut io, &mut buf, budget) {
                    return Ended::Close;
                }
                continue;
            }
        };
        head_began = None;
        body_began = None;
        served += 1;
        info.verdicts.note_head();
        // The pipeline, while watching the client: a client that closes its end
        // abandons the request (as hyper does), and pipelined bytes are kept.
        let mut limit = None;
        let mut resp = {
            let timer = Some(&mut upstream_timer);
            let snap = Some(snapshots.load());
            let handled = std::pin::pin!(proxy::handle_request(shared, info, req, &mut limit, true, timer, snap));
            tokio::select! {
                biased;
                r = handled => match r {
                    Ok(resp) => resp,
                },
                () = client_gone(&mut io, &mut buf, budget) => return Ended::Close,
            }
        };
        proxy::add_rate_limit(&mut resp, limit);
        let keep = match respond(&mut io, &mut buf, budget, &mut out, resp, &asked).await {
            Ok(keep) => keep,
            Err(e) => {
                tracing::trace!(error = %e, "response not sent whole: closed");
                return Ended::Close;
            }
        };
        if !keep || stopping.has_changed().unwrap_or(true) {
            if T::SHUTDOWN_BEFORE_CLOSE {
                let _ = io.shutdown().await;
            }
            return Ended::Close;
        }
        deadline = None;
        // A large write buffer is not kept for the connection's life.
        if out.capacity() > 4 * COPY_LIMIT {
            out = Vec::new();
        }
    }
}

/// What woke a connection waiting between requests.
enum Between {
    /// The socket is readable (`false`: it failed).
    Readable(bool),
    Tick,
    Stop,
}

/// What one read found.
enum Got {
    Bytes,
    /// Nothing yet (the socket's readiness was stale; it is cleared now).
    Nothing,
    /// The client closed its end, or the read failed.
    End,
}

/// Read what the socket has now into `buf` (up to `budget` buffered), without
/// waiting. tokio's read, not `try_read`: a short read clears the socket's
/// readiness, so the next wait costs no system call.
fn read_now<T: Transport>(io: &mut T, buf: &mut BytesMut, budget: usize) -> Got {
    use futures_util::FutureExt;
    buf.reserve(READ_SIZE.min(budget.saturating_sub(buf.len()).max(1)));
    match io.read_buf(buf).now_or_never() {
        None => Got::Nothing,
        Some(Ok(0) | Err(_)) => Got::End,
        Some(Ok(_)) => Got::Bytes,
    }
}

/// Resolves when the client closes its end while a response is being prepared.
/// Bytes it sends meanwhile (a pipelined request) are kept in `buf`, up to
/// `budget`; past that, the socket is left unread until the response is out.
async fn client_gone<T: Transport>(io: &mut T, buf: &mut BytesMut, budget: usize) {
    loop {
        // The socket's own read waker, not `readable()`'s list of waiters: this
        // task is the socket's only reader.
        if buf.len() >= budget || poll_fn(|cx| io.poll_readable(cx)).await.is_err() {
            return std::future::pending().await;
        }
        if let Got::End = read_now(io, buf, budget) {
            return;
        }
    }
}

/// Parse a request head at the front of `buf`; a request for this path is split
/// off it (its header values share the head's memory).
fn parse(buf: &mut BytesMut, max_headers: usize) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let slots = &mut slots[..max_headers.min(MAX_HEADERS)];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    if method == Method::CONNECT {
        return Parsed::Other;
    }
    let http11 = version == 1;
    let mut keep_alive = http11;
    let mut close = false;
    let mut body_len = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("content-length") {
            // One field of plain digits, for a body small enough to hold; anything
            // else (a list, a second field, a sign, a large body) is hyper's.
            if body_len.is_some() || h.value.is_empty() || h.value.len() > 6 || !h.value.iter().all(u8::is_ascii_digit)
            {
                return Parsed::Other;
            }
            let n = h.value.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
            if n > MAX_BODY {
                return Parsed::Other;
            }
            body_len = Some(n);
            continue;
        }
        if is("transfer-encoding") || is("upgrade") || is("expect") {
            return Parsed::Other;
        }
        if is("connection") {
            // As hyper reads it: any `close` wins; HTTP/1.0 keeps alive on request.
            if close || has_token(h.value, "close") {
                close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(h.value, "keep-alive");
            }
        }
    }
    let n = req.headers.len();
    let mut slots = crate::headers::SpanSlots::<MAX_HEADERS>::for_fields(n);
    let spans = slots.slots();
    crate::headers::spans(buf, req.headers, spans);
    let base = buf.as_ptr() as usize;
    let path_at = path.as_ptr() as usize - base;
    let path_range = path_at..path_at + path.len();
    // A body must be here whole, behind the head: one still on its way is waited for.
    if let Some(n) = body_len
        && buf.len() - len < n
    {
        return Parsed::BodyPartial(len + n);
    }
    let head = buf.split_to(len).freeze();
    let built = http::Uri::from_maybe_shared(head.slice(path_range))
        .ok()
        .zip(crate::headers::header_map(&head, &spans[..n], ADDED_FIELDS));
    let Some((uri, headers)) = built else {
        // hyper answers what it cannot read: the head goes back in front.
        unsplit(buf, head);
        return Parsed::Other;
    };
    let version = if http11 { Version::HTTP_11 } else { Version::HTTP_10 };
    let asked = Asked {
        method: method.clone(),
        version,
        keep_alive,
    };
    let body = match body_len {
        None => ClientIn::Empty,
        Some(n) => ClientIn::Full(Some(buf.split_to(n).freeze())),
    };
    let mut r = Request::new(body);
    *r.method_mut() = method;
    *r.uri_mut() = uri;
    *r.version_mut() = version;
    *r.headers_mut() = headers;
    Parsed::Request(r, asked)
}

/// Put `head` (split off the front of `buf`) back in front of it.
fn unsplit(buf: &mut BytesMut, head: Bytes) {
    let mut whole = head.try_into_mut().unwrap_or_else(|h| BytesMut::from(&h[..]));
    whole.unsplit(std::mem::take(buf));
    *buf = whole;
}

/// Whether a comma-separated field value has `token` (any case).
fn has_token(value: &[u8], token: &str) -> bool {
    crate::headers::value_elements(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// How the response body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 and a body of unknown length).
    Close,
}

/// What the body says of its length, as hyper asks it: none left, exactly this
/// much, or not known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyLen {
    None,
    Known(u64),
    Unknown,
}

/// A response the pipeline made that cannot be sent as it is.
#[derive(Debug)]
struct Unsendable(&'static str);

impl std::fmt::Display for Unsendable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Unsendable {}

/// hyper's `can_have_body`: no body for HEAD, 1xx, 204 and 304.
fn can_have_body(method: &Method, status: StatusCode) -> bool {
    *method != Method::HEAD && can_have_length(status)
}

/// hyper's `can_have_content_length`: not 1xx, 204 or 304.
fn can_have_length(status: StatusCode) -> bool {
    !status.is_informational() && status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED
}

/// Write the response head into `out` as hyper's server would, and say how the body
/// is framed and whether the connection stays open after it. `lines`: upstream
/// header lines passed on as they came, beside the map's fields.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &mut http::response::Parts,
    body: BodyLen,
    asked: &Asked,
    lines: Option<&crate::h1client::Passthrough>,
) -> Result<(Framing, bool), Unsendable> {
    if parts.status.is_informational() {
        return Err(Unsendable("interim status as a final response"));
    }
    let (mut close, mut keep_alive) = (false, false);
    for t in crate::headers::list_elements(&parts.headers, header::CONNECTION) {
        close |= t.eq_ignore_ascii_case("close");
        keep_alive |= t.eq_ignore_ascii_case("keep-alive");
    }
    let mut keep = asked.keep_alive && !close;
    if asked.version == Version::HTTP_10 {
        if keep && !keep_alive {
            parts
                .headers
                .append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        }
        out.extend_from_slice(b"HTTP/1.0 ");
    } else {
        if !keep && !close {
            parts
                .headers
                .append(header::CONNECTION, HeaderValue::from_static("close"));
        }
        out.extend_from_slice(b"HTTP/1.1 ");
    }
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(r) => out.extend_from_slice(r.as_bytes()),
        None => out.extend_from_slice(parts.status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");

    let head = asked.method == Method::HEAD;
    let mut framing = None;
    let mut wrote_date = false;
    if let Some(lines) = lines {
        lines.write_to(out);
        wrote_date = lines.date;
    }
    for (name, value) in &parts.headers {
        match *name {
            header::CONTENT_LENGTH => {
                // hyper writes one Content-Length line.
                if framing.is_some() {
                    continue;
                }
                match body {
                    BodyLen::Known(n) => framing = Some(Framing::Length(n)),
                    // The field frames a streaming body: every copy must agree.
                    BodyLen::Unknown => match crate::headers::content_length(&parts.headers) {
                        Ok(Some(n)) => framing = Some(Framing::Length(n)),
                        Ok(None) | Err(_) => return Err(Unsendable("bad or conflicting Content-Length")),
                    },
                    // A HEAD answer keeps its length; an empty body's is written below.
                    BodyLen::None if head => framing = Some(Framing::Length(0)),
                    BodyLen::None => continue,
                }
            }
            // The body's framing is decided here, not by a field the pipeline left.
            header::TRANSFER_ENCODING => continue,
            header::DATE => wrote_date = true,
            _ => {}
        }
        crate::headers::write_field(out, name, value.as_bytes());
    }
    let status = parts.status;
    let framing = match (framing, body) {
        (Some(f), _) => f,
        (None, BodyLen::Unknown) => {
            if asked.version == Version::HTTP_10 || !can_have_body(&asked.method, status) {
                Framing::Close
            } else {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        }
        (None, BodyLen::None | BodyLen::Known(0)) => {
            if can_have_length(status) && !head {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            Framing::Length(0)
        }
        (None, BodyLen::Known(n)) => {
            if can_have_length(status) {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
                Framing::Length(n)
            } else {
                Framing::Length(0)
            }
        }
    };
    let framing = if can_have_body(&asked.method, status) {
        framing
    } else {
        Framing::Length(0)
    };
    if framing == Framing::Close {
        keep = false;
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok((framing, keep))
}

/// Send the response; true when the connection may carry another request.
async fn respond<T: Transport>(
    io: &mut T,
    buf: &mut BytesMut,
    budget: usize,
    out: &mut Vec<u8>,
    resp: Response<EdgeBody>,
    asked: &Asked,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let (mut parts, mut body) = resp.into_parts();
    let len = if body.is_end_stream() {
        BodyLen::None
    } else {
        body.size_hint().exact().map_or(BodyLen::Unknown, BodyLen::Known)
    };
    out.clear();
    let lines = body.take_passthrough();
    let (framing, keep) = encode_head(out, &mut parts, len, asked, lines.as_deref())?;
    drop(lines);
    drop(parts);
    // What a Content-Length still promises.
    let mut left = match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    // A body with nothing to send on the wire is not read (hyper drops it too).
    let mut ended = framing == Framing::Length(0);
    while !ended {
        // The next frame if it is ready; else send what is waiting and wait for it,
        // watching for the client going away (as hyper does).
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    io.write_all(out).await?;
                    out.clear();
                }
                // A TLS stream may still hold part of what was written.
                io.flush().await?;
                tokio::select! {
                    biased;
                    f = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => f,
                    () = client_gone(io, buf, budget) => return Err(Box::new(Unsendable("client went away"))),
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(e),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                // Trailers: not sent (see the module notes).
                Err(_) => {
                    ended = body.is_end_stream();
                    continue;
                }
            },
        };
        ended = body.is_end_stream();
        if data.is_empty() {
            continue;
        }
        let n = data.len() as u64;
        if let Some(l) = &mut left {
            *l = l
                .checked_sub(n)
                .ok_or(Unsendable("body longer than its Content-Length"))?;
        }
        if framing == Framing::Chunked {
            let mut hex = [0u8; 16];
            out.extend_from_slice(hex_len(data.len(), &mut hex));
            out.extend_from_slice(b"\r\n");
        }
        if data.len() <= COPY_LIMIT {
            out.extend_from_slice(&data);
        } else {
            if !out.is_empty() {
                io.write_all(out).await?;
                out.clear();
            }
            io.write_all(&data).await?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    drop(body);
    if left.is_some_and(|l| l != 0) {
        // Cut short: the client sees the connection close before the length is
        // reached, and cannot take what follows for a next response.
        if !out.is_empty() {
            io.write_all(out).await?;
        }
        io.flush().await?;
        return Err(Box::new(Unsendable("body shorter than its Content-Length")));
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    io.flush().await?;
    Ok(keep)
}

/// `n` in hexadecimal, as a chunk-size line starts.
fn hex_len(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The `Date` field's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    pub(super) fn extend(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let text = httpdate::fmt_http_date(now);
                if let Some(b) = text.as_bytes().get(..29) {
                    c.1.copy_from_slice(b);
                }
                c.0 = secs;
            }
            out.extend_from_slice(&c.1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        let p = parse(&mut buf, 100);
        (p, buf)
    }

    #[test]
    fn simple_requests_are_read_and_the_rest_left_alone() {
        let (p, rest) = parse_text("GET /a?b=1 HTTP/1.1\r\nHost: t\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /next");
        let Parsed::Request(req, asked) = p else {
            panic!("a request")
        };
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers().get_all("x-a").iter().count(), 2);
        assert!(asked.keep_alive);
        assert_eq!(&rest[..], b"GET /next", "a pipelined request stays in the buffer");

        // One Content-Length with the whole body behind the head: the body is split
        // off with it (even an empty one), and what follows stays.
        for (text, body) in [
            (
                "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhelloGET /next",
                &b"hello"[..],
            ),
            ("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\nGET /next", b""),
            (
                "POST / HTTP/1.1\r\nHost: t\r\ncontent-length: 003\r\n\r\nabcGET /next",
                b"abc",
            ),
        ] {
            let (Parsed::Request(req, _), rest) = parse_text(text) else {
                panic!("{text:?}: a request")
            };
            let ClientIn::Full(Some(got)) = req.body() else {
                panic!("{text:?}: a whole body")
            };
            assert_eq!(&got[..], body, "{text:?}");
            assert_eq!(&rest[..], b"GET /next", "{text:?}");
        }

        let big = format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        // The body is not all here yet: wait for it, the buffer as it was.
        let text = "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhell";
        let (p, rest) = parse_text(text);
        assert!(matches!(p, Parsed::BodyPartial(n) if n == text.len() + 1));
        assert_eq!(&rest[..], text.as_bytes());

        for text in [
            // Larger than the lean path holds.
            big.as_str(),
            // Two fields, a list, a sign, no digits, or too many digits.
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1, 1\r\n\r\nab",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +1\r\n\r\nab",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: \r\n\r\nab",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0000001\r\n\r\nab",
            // With Transfer-Encoding, either way round.
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
            "CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n",
        ] {
            let (p, rest) = parse_text(text);
            assert!(matches!(p, Parsed::Other), "{text:?} is hyper's");
            assert_eq!(&rest[..], text.as_bytes(), "{text:?}: the buffer is as it was");
        }
        assert!(matches!(parse_text("GET / HTTP/1.1\r\nHost: t\r\n").0, Parsed::Partial));

        // More fields than the small array of spans holds: all of them, in order.
        let mut text = String::from("GET / HTTP/1.1\r\nHost: t\r\n");
        for i in 0..30 {
            text.push_str(&format!("X-{}: {i}\r\n", i % 7));
        }
        text.push_str("\r\n");
        let (Parsed::Request(req, _), _) = parse_text(&text) else {
            panic!("a request")
        };
        assert_eq!(req.headers().len(), 31);
        let sixes: Vec<_> = req
            .headers()
            .get_all("x-6")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(sixes, ["6", "13", "20", "27"]);
    }

    #[test]
    fn keep_alive_is_read_as_hyper_reads_it() {
        for (text, keep) in [
            ("GET / HTTP/1.1\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            ("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n", false),
            (
                "GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
                false,
            ),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
            (
                "GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
                false,
            ),
        ] {
            let (Parsed::Request(_, asked), _) = parse_text(text) else {
                panic!("{text:?}")
            };
            assert_eq!(asked.keep_alive, keep, "{text:?}");
        }
    }

    /// The head without its `date` line, the framing and whether the connection stays.
    fn encode(
        method: Method,
        version: Version,
        keep_alive: bool,
        status: u16,
        fields: &[(&'static str, &'static str)],
        body: BodyLen,
    ) -> (String, Framing, bool) {
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in fields {
            resp.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        let (mut parts, ()) = resp.into_parts();
        let asked = Asked {
            method,
            version,
            keep_alive,
        };
        let mut out = Vec::new();
        let (framing, keep) = encode_head(&mut out, &mut parts, body, &asked, None).unwrap();
        let text = String::from_utf8(out).unwrap();
        let text: Vec<&str> = text.split("\r\n").filter(|l| !l.starts_with("date: ")).collect();
        (text.join("\r\n"), framing, keep)
    }

    #[test]
    fn response_heads_follow_hyper() {
        use BodyLen::{Known, None as Empty, Unknown};
        let (get, head, v11, v10) = (Method::GET, Method::HEAD, Version::HTTP_11, Version::HTTP_10);
        let cases = [
            // A known length is written from the body.
            (
                get.clone(),
                v11,
                true,
                200,
                vec![],
                Known(5),
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            // The header's value is kept when the body agrees.
            (
                get.clone(),
                v11,
                true,
                200,
                vec![("content-length", "5")],
                Known(5),
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            // Unknown length: chunked for HTTP/1.1, until close for HTTP/1.0.
            (
                get.clone(),
                v11,
                true,
                200,
                vec![],
                Unknown,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                get.clone(),
                v10,
                true,
                200,
                vec![],
                Unknown,
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n",
                Framing::Close,
                false,
            ),
            // A length header with a streaming body frames it.
            (
                get.clone(),
                v11,
                true,
                200,
                vec![("content-length", "7")],
                Unknown,
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n",
                Framing::Length(7),
                true,
            ),
            // An empty body: length zero, except where no length may be sent.
            (
                get.clone(),
                v11,
                true,
                404,
                vec![],
                Empty,
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
                Framing::Length(0),
                true,
            ),
            (
                get.clone(),
                v11,
                true,
                204,
                vec![("content-length", "0")],
                Empty,
                "HTTP/1.1 204 No Content\r\n\r\n",
                Framing::Length(0),
                true,
            ),
            (
                get.clone(),
                v11,
                true,
                304,
                vec![("etag", "\"x\"")],
                Empty,
                "HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n",
                Framing::Length(0),
                true,
            ),
            // HEAD keeps the length it was given and sends no body.
            (
                head.clone(),
                v11,
                true,
                200,
                vec![("content-length", "18")],
                Empty,
                "HTTP/1.1 200 OK\r\ncontent-length: 18\r\n\r\n",
                Framing::Length(0),
                true,
            ),
            (
                head.clone(),
                v11,
                true,
                200,
                vec![],
                Unknown,
                "HTTP/1.1 200 OK\r\n\r\n",
                Framing::Length(0),
                true,
            ),
            // Closing: the client's close is answered; the pipeline's close is kept.
            (
                get.clone(),
                v11,
                false,
                200,
                vec![],
                Known(1),
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            (
                get.clone(),
                v11,
                true,
                400,
                vec![("connection", "close")],
                Known(1),
                "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            (
                get.clone(),
                v10,
                true,
                400,
                vec![("connection", "close")],
                Known(1),
                "HTTP/1.0 400 Bad Request\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            (
                get.clone(),
                v10,
                false,
                200,
                vec![],
                Known(1),
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            // A transfer coding the pipeline left is not trusted for the framing.
            (
                get.clone(),
                v11,
                true,
                200,
                vec![("transfer-encoding", "gzip")],
                Known(3),
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n",
                Framing::Length(3),
                true,
            ),
            (
                get.clone(),
                v11,
                true,
                599,
                vec![],
                Empty,
                "HTTP/1.1 599 <none>\r\ncontent-length: 0\r\n\r\n",
                Framing::Length(0),
                true,
            ),
        ];
        for (method, version, keep_alive, status, fields, body, text, framing, keep) in cases {
            let got = encode(method.clone(), version, keep_alive, status, &fields, body);
            assert_eq!(
                got,
                (text.to_string(), framing, keep),
                "{method} {version:?} {status} {fields:?} {body:?}"
            );
        }
    }

    #[test]
    fn unsendable_responses_are_refused() {
        let asked = Asked {
            method: Method::GET,
            version: Version::HTTP_11,
            keep_alive: true,
        };
        for (status, fields) in [
            (100, vec![]),
            (200, vec![("content-length", "x")]),
            (200, vec![("content-length", "1"), ("content-length", "2")]),
        ] {
            let mut resp = Response::new(());
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            for (k, v) in &fields {
                resp.headers_mut().append(*k, HeaderValue::from_static(v));
            }
            let (mut parts, ()) = resp.into_parts();
            let r = encode_head(&mut Vec::new(), &mut parts, BodyLen::Unknown, &asked, None);
            assert!(r.is_err(), "{status} {fields:?}");
        }
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        let mut b = [0u8; 16];
        assert_eq!(hex_len(0, &mut b), b"0");
        assert_eq!(hex_len(255, &mut b), b"ff");
        assert_eq!(hex_len(4096, &mut b), b"1000");
        assert_eq!(hex_len(usize::MAX, &mut b), b"ffffffffffffffff");
    }

    #[test]
    fn the_date_is_an_imf_fixdate() {
        let mut out = Vec::new();
        date::extend(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.len(), 29);
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
    }
}
