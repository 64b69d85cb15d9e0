//! A framing guard on HTTP/1 client connections: it reads along with hyper's parser,
//! without buffering or allocating, and catches what hyper accepts silently.
//!
//! - A request head with both `Content-Length` and `Transfer-Encoding`: hyper drops
//!   the length and uses the chunked framing (RFC 9112 §6.3 allows that), so the
//!   handler could not tell. The guard marks the head; the handler refuses it with
//!   400 `BAD_FRAMING` and closes the connection.
//! - Chunk extensions that break RFC 9112 §7.1.1 (`;` name [`=` token / quoted-string],
//!   with optional whitespace), chunk-size lines over 4 KiB, and chunk data not ended
//!   by CRLF: hyper skips extensions unchecked, so the guard fails the read, the
//!   request body fails, and the client gets 400 with the connection closed.
//!
//! The guard follows message boundaries with the same framing hyper uses (chunked,
//! else `Content-Length`, else no body). It stops watching a connection that
//! upgrades, sends `CONNECT`, speaks HTTP/2, or sends a head larger than hyper will
//! read (hyper answers that one with 431 itself).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, ReadBuf};

/// Per-connection state shared by the guard (what it read), the request handler
/// (responses in flight, framing verdicts) and the listener (parking).
#[derive(Default)]
pub struct Verdicts {
    /// Request heads completed so far.
    heads: AtomicU64,
    /// The 1-based number of the first head with both framings (0: none).
    bad_head: AtomicU64,
    /// The connection is being parked: hyper's shutdown of the stream is not passed
    /// on (the socket stays open for the client's next request).
    parking: AtomicBool,
    /// Where the stream stands: [`AT_BOUNDARY`], [`IN_HEAD`] (part of a head read;
    /// the listener's header timeout watches it), or [`MID_MESSAGE`] (a body still
    /// coming, or a stream the guard stopped following). Only a connection at a
    /// boundary is parked (a partial head keeps its header timer).
    position: AtomicU8,
    /// Responses the service made whose bodies are still being sent.
    in_flight: AtomicUsize,
    /// A head hyper refused, answered by the guard, for the access log.
    refused: std::sync::Mutex<Option<Box<Refusal>>>,
}

/// A request head hyper could not parse, and Rampart's answer to it.
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub request_id: crate::headers::RequestId,
    /// The answer's length.
    pub bytes: usize,
}

/// A response in flight on its connection, until dropped (with the response body).
pub struct InFlight(Arc<Verdicts>);

impl InFlight {
    pub fn enter(v: &Arc<Verdicts>) -> InFlight {
        v.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(v.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Verdicts {
    /// A parked connection's verdicts when it is served again: `heads` heads
    /// read before, every one of them answered.
    pub fn resumed(heads: u64) -> Verdicts {
        Verdicts {
            heads: AtomicU64::new(heads),
            ..Verdicts::default()
        }
    }

    /// Request heads completed so far on this connection.
    pub fn heads(&self) -> u64 {
        self.heads.load(Ordering::Relaxed)
    }

    /// A request head read by the lean server path (`crate::h1server`), which the
    /// guard does not see: counted, so request numbers stay those of the heads.
    pub fn note_head(&self) {
        self.heads.fetch_add(1, Ordering::Relaxed);
    }

    /// Responses in flight on this connection.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether everything read so far ends exactly at the end of a message.
    pub fn at_boundary(&self) -> bool {
        self.position.load(Ordering::Relaxed) == AT_BOUNDARY
    }

    /// Whether part of a request head has been read, and not the rest.
    pub fn in_head(&self) -> bool {
        self.position.load(Ordering::Relaxed) == IN_HEAD
    }

    /// The head hyper refused on this connection, if any (taken once).
    pub fn take_refusal(&self) -> Option<Box<Refusal>> {
        self.refused.lock().ok().and_then(|mut r| r.take())
    }

    pub fn set_parking(&self, on: bool) {
        self.parking.store(on, Ordering::Relaxed);
    }

    /// Whether request number `n` (1-based, in arrival order) had ambiguous framing.
    pub fn ambiguous(&self, n: u64) -> bool {
        n != 0 && self.bad_head.load(Ordering::Relaxed) == n
    }
}

/// [`Verdicts`]' positions of the stream.
const AT_BOUNDARY: u8 = 0;
const IN_HEAD: u8 = 1;
const MID_MESSAGE: u8 = 2;

/// The longest chunk-size line (extensions included) and the largest trailer
/// section a chunked body may have (Rampart's own HTTP/1 client holds upstream
/// responses to the same bounds).
pub(crate) const MAX_CHUNK_LINE: u32 = 4096;
pub(crate) const MAX_TRAILERS: u32 = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Other,
    ContentLength,
    TransferEncoding,
    Upgrade,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ext {
    /// Reading the size digits (then whitespace, `;` or CR).
    AfterSize,
    /// Whitespace after the size: more whitespace, `;` or CR.
    SizeBlank,
    BeforeName,
    Name,
    AfterName,
    BeforeValue,
    Token,
    Quoted,
    QuotedEscape,
    AfterValue,
    Cr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize {
        digits: u8,
        size: u64,
        len: u32,
        ext: Ext,
    },
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    Trailers {
        line: u32,
        total: u32,
    },
    /// Not watching any more (upgrade, CONNECT, HTTP/2, oversized head).
    Off,
}

/// The head being read, field by field, without keeping it.
#[derive(Clone, Copy, Debug)]
struct Head {
    request_line_seen: bool,
    line_len: u32,
    total: u32,
    in_name: bool,
    name: [u8; 17],
    name_len: u8,
    /// The name is longer than any watched one.
    name_long: bool,
    field: Field,
    /// The last seven non-blank bytes of the current `Transfer-Encoding` value.
    te_tail: [u8; 7],
    method: [u8; 8],
    method_len: u8,
    method_done: bool,
    has_cl: bool,
    cl: Option<u64>,
    cl_bad: bool,
    has_te: bool,
    te_chunked: bool,
    upgrade: bool,
}

impl Head {
    /// Within text whose bytes change nothing but the head's size: the request line
    /// after the method, or the value of a field not watched. The line already has
    /// a byte (the method's or the name's), so its emptiness is settled too.
    fn in_dull_text(&self) -> bool {
        if self.request_line_seen {
            !self.in_name && self.field == Field::Other
        } else {
            self.method_done
        }
    }

    fn new() -> Head {
        Head {
            request_line_seen: false,
            line_len: 0,
            total: 0,
            in_name: true,
            name: [0; 17],
            name_len: 0,
            name_long: false,
            field: Field::Other,
            te_tail: [0; 7],
            method: [0; 8],
            method_len: 0,
            method_done: false,
            has_cl: false,
            cl: None,
            cl_bad: false,
            has_te: false,
            te_chunked: false,
            upgrade: false,
        }
    }
}

/// The framing tracker itself, independent of any I/O (unit-tested byte by byte).
pub struct Tracker {
    state: State,
    head: Head,
    max_head: u32,
    verdicts: Arc<Verdicts>,
}

/// A violation found in a body: the read fails with this.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation(pub &'static str);

fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

impl Tracker {
    pub fn new(max_head: usize, verdicts: Arc<Verdicts>) -> Tracker {
        Tracker {
            state: State::Head,
            head: Head::new(),
            max_head: u32::try_from(max_head).unwrap_or(u32::MAX),
            verdicts,
        }
    }

    /// Follow `bytes` as read from the client. A violation comes with the number of
    /// bytes before the offending one (those were fine).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), (usize, Violation)> {
        let total = bytes.len();
        self.feed_inner(bytes, total)
    }

    fn feed_inner(&mut self, mut bytes: &[u8], total: usize) -> Result<(), (usize, Violation)> {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return Ok(()),
                State::Fixed(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[usize::try_from(n).unwrap_or(bytes.len())..];
                    self.state = if left == n { State::Head } else { State::Fixed(left - n) };
                }
                State::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[usize::try_from(n).unwrap_or(bytes.len())..];
                    self.state = if left == n {
                        State::ChunkDataCr
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::Head if self.head.in_dull_text() => {
                    // The rest of the request line or of a value nobody watches:
                    // only its length and its end matter, so skip to the line feed.
                    let n = memchr::memchr(b'\n', bytes).unwrap_or(bytes.len());
                    let h = &mut self.head;
                    match u32::try_from(n).ok().and_then(|n| h.total.checked_add(n)) {
                        Some(t) if t <= self.max_head => {
                            h.total = t;
                            bytes = &bytes[n..];
                            if let Some(&b) = bytes.first() {
                                let at = total - bytes.len();
                                bytes = &bytes[1..];
                                self.byte(b).map_err(|v| (at, v))?;
                            }
                        }
                        // Over the bound: byte by byte finds the exact byte.
                        _ => {
                            let b = bytes[0];
                            let at = total - bytes.len();
                            bytes = &bytes[1..];
                            self.byte(b).map_err(|v| (at, v))?;
                        }
                    }
                }
                _ => {
                    let b = bytes[0];
                    let at = total - bytes.len();
                    bytes = &bytes[1..];
                    self.byte(b).map_err(|v| (at, v))?;
                }
            }
        }
        Ok(())
    }

    fn byte(&mut self, b: u8) -> Result<(), Violation> {
        match self.state {
            State::Head => {
                self.head_byte(b);
                Ok(())
            }
            State::ChunkSize { digits, size, len, ext } => self.chunk_size_byte(b, digits, size, len, ext),
            State::ChunkDataCr if b == b'\r' => {
                self.state = State::ChunkDataLf;
                Ok(())
            }
            State::ChunkDataLf if b == b'\n' => {
                self.state = State::ChunkSize {
                    digits: 0,
                    size: 0,
                    len: 0,
                    ext: Ext::AfterSize,
                };
                Ok(())
            }
            State::ChunkDataCr | State::ChunkDataLf => Err(Violation("chunk-data-not-followed-by-crlf")),
            State::Trailers { line, total } => {
                if total >= MAX_TRAILERS {
                    // hyper bounds trailers too; stop following rather than guess.
                    self.state = State::Off;
                } else if b == b'\n' {
                    self.state = if line == 0 {
                        self.head = Head::new();
                        State::Head
                    } else {
                        State::Trailers {
                            line: 0,
                            total: total + 1,
                        }
                    };
                } else if b == b'\r' && line == 0 {
                    // The CR of an empty line.
                } else {
                    self.state = State::Trailers {
                        line: line + 1,
                        total: total + 1,
                    };
                }
                Ok(())
            }
            State::Off | State::Fixed(_) | State::ChunkData(_) => Ok(()),
        }
    }

    fn chunk_size_byte(&mut self, b: u8, digits: u8, size: u64, len: u32, ext: Ext) -> Result<(), Violation> {
        if len >= MAX_CHUNK_LINE {
            return Err(Violation("chunk-line-too-long"));
        }
        let len = len + 1;
        let hex = (b as char).to_digit(16);
        // Size digits first.
        if ext == Ext::AfterSize
            && let Some(d) = hex
        {
            if digits >= 16 {
                return Err(Violation("invalid-chunk-size"));
            }
            self.state = State::ChunkSize {
                digits: digits + 1,
                size: size << 4 | u64::from(d),
                len,
                ext,
            };
            return Ok(());
        }
        if digits == 0 {
            return Err(Violation("invalid-chunk-size"));
        }
        let bad = Err(Violation("invalid-chunk-extension"));
        let next = match ext {
            Ext::AfterSize | Ext::SizeBlank if blank(b) => Ext::SizeBlank,
            Ext::AfterName | Ext::AfterValue if blank(b) => ext,
            Ext::AfterSize | Ext::SizeBlank | Ext::Name | Ext::AfterName | Ext::Token | Ext::AfterValue
                if b == b';' =>
            {
                Ext::BeforeName
            }
            Ext::AfterSize | Ext::SizeBlank | Ext::Name | Ext::AfterName | Ext::Token | Ext::AfterValue
                if b == b'\r' =>
            {
                Ext::Cr
            }
            Ext::BeforeName | Ext::BeforeValue if blank(b) => ext,
            Ext::BeforeName | Ext::Name if tchar(b) => Ext::Name,
            Ext::Name | Ext::Token if blank(b) => {
                if ext == Ext::Name {
                    Ext::AfterName
                } else {
                    Ext::AfterValue
                }
            }
            Ext::Name | Ext::AfterName if b == b'=' => Ext::BeforeValue,
            Ext::BeforeValue | Ext::Token if tchar(b) => Ext::Token,
            Ext::BeforeValue if b == b'"' => Ext::Quoted,
            Ext::Quoted if b == b'"' => Ext::AfterValue,
            Ext::Quoted if b == b'\\' => Ext::QuotedEscape,
            // qdtext: HTAB, SP, VCHAR except `"` and `\`, obs-text.
            Ext::Quoted if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 => Ext::Quoted,
            Ext::QuotedEscape if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 => Ext::Quoted,
            Ext::Cr if b == b'\n' => {
                self.state = if size == 0 {
                    State::Trailers { line: 0, total: 0 }
                } else {
                    State::ChunkData(size)
                };
                return Ok(());
            }
            _ => return bad,
        };
        self.state = State::ChunkSize {
            digits,
            size,
            len,
            ext: next,
        };
        Ok(())
    }

    fn head_byte(&mut self, b: u8) {
        let h = &mut self.head;
        h.total += 1;
        if h.total > self.max_head {
            self.state = State::Off;
            return;
        }
        if b == b'\n' {
            self.end_line();
            return;
        }
        if b == b'\r' {
            // Only as part of a line end (hyper refuses a bare CR).
            return;
        }
        h.line_len += 1;
        if !h.request_line_seen {
            if !h.method_done {
                if b == b' ' {
                    h.method_done = true;
                } else if usize::from(h.method_len) < h.method.len() {
                    h.method[usize::from(h.method_len)] = b;
                    h.method_len += 1;
                }
            }
            return;
        }
        if h.in_name {
            if b == b':' {
                h.in_name = false;
                let name = h.name.get(..usize::from(h.name_len)).unwrap_or_default();
                h.field = match name {
                    _ if h.name_long => Field::Other,
                    b"content-length" => Field::ContentLength,
                    b"transfer-encoding" => Field::TransferEncoding,
                    b"upgrade" => Field::Upgrade,
                    _ => Field::Other,
                };
                match h.field {
                    Field::ContentLength => {
                        h.has_cl = true;
                        h.cl = None;
                    }
                    Field::TransferEncoding => {
                        h.has_te = true;
                        h.te_tail = [0; 7];
                    }
                    Field::Upgrade => h.upgrade = true,
                    Field::Other => {}
                }
            } else if usize::from(h.name_len) < h.name.len() {
                h.name[usize::from(h.name_len)] = b.to_ascii_lowercase();
                h.name_len += 1;
            } else {
                h.name_long = true;
            }
            return;
        }
        match h.field {
            Field::ContentLength if !blank(b) => match (b as char).to_digit(10) {
                Some(d) => {
                    h.cl =
                        h.cl.unwrap_or(0)
                            .checked_mul(10)
                            .and_then(|v| v.checked_add(u64::from(d)));
                    if h.cl.is_none() {
                        h.cl_bad = true;
                    }
                }
                None => h.cl_bad = true,
            },
            Field::TransferEncoding if !blank(b) => {
                h.te_tail.rotate_left(1);
                h.te_tail[6] = b.to_ascii_lowercase();
            }
            _ => {}
        }
    }

    fn end_line(&mut self) {
        let h = &mut self.head;
        let empty = h.line_len == 0;
        if !h.request_line_seen {
            if empty {
                // Blank lines before a request line are skipped.
                return;
            }
            h.request_line_seen = true;
            let method = &h.method[..usize::from(h.method_len)];
            if method == b"CONNECT" || method == b"PRI" {
                self.state = State::Off;
            }
        } else if empty {
            self.end_head();
            return;
        } else if h.field == Field::TransferEncoding {
            h.te_chunked = &h.te_tail == b"chunked";
        }
        h.line_len = 0;
        h.in_name = true;
        h.name_len = 0;
        h.name_long = false;
        h.field = Field::Other;
    }

    fn end_head(&mut self) {
        let h = self.head;
        let n = self.verdicts.heads.fetch_add(1, Ordering::Relaxed) + 1;
        if h.has_cl && h.has_te {
            let _ = self
                .verdicts
                .bad_head
                .compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.head = Head::new();
        self.state = if h.upgrade {
            State::Off
        } else if h.has_te {
            if h.te_chunked {
                State::ChunkSize {
                    digits: 0,
                    size: 0,
                    len: 0,
                    ext: Ext::AfterSize,
                }
            } else {
                // hyper refuses it and closes.
                State::Off
            }
        } else if h.has_cl {
            match (h.cl, h.cl_bad) {
                (Some(0), false) => State::Head,
                (Some(n), false) => State::Fixed(n),
                _ => State::Off,
            }
        } else {
            State::Head
        };
    }
}

/// The client stream with a [`Tracker`] reading along. The bytes before a violation
/// are delivered (so hyper can answer the request they belong to); the next read
/// fails.
pub struct Guarded<T> {
    inner: T,
    tracker: Tracker,
    failed: Option<&'static str>,
    /// hyper's own error answer, rewritten, and how much of it is written.
    answer: Option<(Vec<u8>, usize)>,
}

impl<T> Guarded<T> {
    pub fn new(inner: T, max_head: usize, verdicts: Arc<Verdicts>) -> Guarded<T> {
        Guarded {
            inner,
            tracker: Tracker::new(max_head, verdicts),
            failed: None,
            answer: None,
        }
    }

    /// Whether the stream is between messages with `buffered` bytes read past the
    /// last one: the bytes of a next head not yet complete, and nothing else (no
    /// body left, nothing refused, nothing this guard stopped following).
    pub fn between_messages(&self, buffered: usize) -> bool {
        self.failed.is_none()
            && self.tracker.state == State::Head
            && usize::try_from(self.tracker.head.total).is_ok_and(|t| t == buffered)
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(what) = this.failed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, what)));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fed = this.tracker.feed(&buf.filled()[before..]);
                let t = &this.tracker;
                let position = match t.state {
                    State::Head if t.head.total == 0 => AT_BOUNDARY,
                    State::Head => IN_HEAD,
                    _ => MID_MESSAGE,
                };
                t.verdicts.position.store(position, Ordering::Relaxed);
                if let Err((good, Violation(what))) = fed {
                    this.failed = Some(what);
                    if good == 0 {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, what)));
                    }
                    buf.set_filled(before + good);
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// The answer hyper writes by itself when it cannot parse a request head (400, 431,
/// 414, ...): `HTTP/1.1 CODE TEXT`, `connection: close`, `content-length: 0` and
/// `date`, nothing else. Every answer the service makes carries `x-request-id`, so
/// this exact form is hyper's alone. Returned rewritten as Rampart answers: with a
/// request id, a reason code and the JSON body.
fn rewrite_hyper_answer(buf: &[u8]) -> Option<(Vec<u8>, Refusal)> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    let line_end = memchr::memchr(b'\r', rest)?;
    let (status_line, tail) = rest.split_at(line_end);
    let code = std::str::from_utf8(status_line.get(..3)?).ok()?.parse::<u16>().ok()?;
    if !(400..600).contains(&code) || status_line.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    let date = tail.strip_prefix(b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ")?;
    let date = date.strip_suffix(b"\r\n\r\n")?;
    if date.len() != 29 || date.contains(&b'\r') {
        return None;
    }
    let kind = match code {
        414 => crate::reason::Reason::UriTooLong,
        431 => crate::reason::Reason::HeadersTooLarge,
        _ => crate::reason::Reason::BadRequest,
    };
    let reason = kind.as_str();
    let request_id = crate::headers::RequestId::generate();
    let id = request_id.as_str();
    let body = kind.json_body(code, id, None);
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status_line);
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\nx-request-id: ");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\r\nx-rampart-reason: ");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\nconnection: close\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    let refusal = Refusal {
        status: code,
        reason,
        request_id,
        bytes: out.len(),
    };
    Some((out, refusal))
}

impl<T: tokio::io::AsyncWrite + Unpin> Guarded<T> {
    /// Whether `first` (and `len` bytes in all) may be hyper's own error answer:
    /// nothing of the service's is being sent, and it looks like a status line.
    fn maybe_hyper_answer(&self, first: &[u8], len: usize) -> bool {
        len <= 512 && first.starts_with(b"HTTP/1.1 ") && self.tracker.verdicts.in_flight() == 0
    }

    /// Take `bytes` as hyper's write: if they are hyper's own error answer, queue
    /// the rewritten answer instead and report them written.
    fn intercept(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Option<Poll<io::Result<usize>>> {
        let (answer, refusal) = rewrite_hyper_answer(bytes)?;
        if let Ok(mut r) = self.tracker.verdicts.refused.lock() {
            *r = Some(Box::new(refusal));
        }
        self.answer = Some((answer, 0));
        Some(match self.poll_answer(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Written or not yet: hyper flushes next, which finishes it.
            _ => Poll::Ready(Ok(bytes.len())),
        })
    }

    /// Write what is left of a rewritten answer.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.answer {
            if *done >= bytes.len() {
                self.answer = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Guarded<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        if this.maybe_hyper_answer(buf, buf.len())
            && let Some(done) = this.intercept(cx, buf)
        {
            return done;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        // hyper writes its own answer as one buffer.
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if first.len() == len
            && this.maybe_hyper_answer(first, len)
            && let Some(done) = this.intercept(cx, first)
        {
            return done;
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    /// Not passed on while the connection is being parked: hyper ends an idle
    /// connection with a shutdown, but a parked one keeps its socket open.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_answer(cx))?;
        if this.tracker.verdicts.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `input` whole and byte by byte; both must agree.
    fn run(input: &[u8]) -> (Result<(), Violation>, State, u64, u64) {
        let strip = |r: Result<(), (usize, Violation)>| r.map_err(|(_, v)| v);
        let whole = {
            let v = Arc::new(Verdicts::default());
            let mut t = Tracker::new(64 * 1024, v.clone());
            let r = strip(t.feed(input));
            (
                r,
                t.state,
                v.heads.load(Ordering::Relaxed),
                v.bad_head.load(Ordering::Relaxed),
            )
        };
        let v = Arc::new(Verdicts::default());
        let mut t = Tracker::new(64 * 1024, v.clone());
        let mut r = Ok(());
        for b in input {
            r = strip(t.feed(std::slice::from_ref(b)));
            if r.is_err() {
                break;
            }
        }
        let split = (
            r,
            t.state,
            v.heads.load(Ordering::Relaxed),
            v.bad_head.load(Ordering::Relaxed),
        );
        assert_eq!(whole, split, "{:?}", String::from_utf8_lossy(input));
        // And in two reads split anywhere (the fast path over dull text stops and
        // resumes mid-line).
        for at in (1..input.len()).filter(|_| input.len() < 1024) {
            let v = Arc::new(Verdicts::default());
            let mut t = Tracker::new(64 * 1024, v.clone());
            let r = strip(t.feed(&input[..at])).and_then(|()| strip(t.feed(&input[at..])));
            let two = (
                r,
                t.state,
                v.heads.load(Ordering::Relaxed),
                v.bad_head.load(Ordering::Relaxed),
            );
            assert_eq!(whole, two, "split at {at}: {:?}", String::from_utf8_lossy(input));
        }
        whole
    }

    #[test]
    fn only_hyper_s_own_error_answer_is_rewritten() {
        let date = "Tue, 24 Nov 2026 01:26:28 GMT";
        let hyper = format!(
            "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"
        );
        let (out, refusal) = rewrite_hyper_answer(hyper.as_bytes()).unwrap();
        assert_eq!(
            (refusal.status, refusal.reason, refusal.bytes),
            (431, "REQUEST_HEADERS_TOO_LARGE", out.len())
        );
        let out = String::from_utf8(out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{head}"
        );
        assert!(
            head.contains("\r\nx-rampart-reason: REQUEST_HEADERS_TOO_LARGE\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(head.ends_with(&format!("\r\ndate: {date}")), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["status"], 431);
        assert!(head.contains(&format!("x-request-id: {}", json["request_id"].as_str().unwrap())));
        assert_eq!(refusal.request_id.as_str(), json["request_id"].as_str().unwrap());
        let bad = format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n");
        assert!(
            String::from_utf8(rewrite_hyper_answer(bad.as_bytes()).unwrap().0)
                .unwrap()
                .contains("BAD_REQUEST")
        );
        for not_hyper in [
            format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"),
            format!(
                "HTTP/1.1 400 Bad Request\r\nx-request-id: 1\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"
            ),
            format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\nbody"),
            format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 2\r\ndate: {date}\r\n\r\n"),
            "HTTP/1.1 4000\r\n".to_string(),
            String::new(),
        ] {
            assert!(rewrite_hyper_answer(not_hyper.as_bytes()).is_none(), "{not_hyper:?}");
        }
    }

    #[test]
    fn follows_keep_alive_messages() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1;q=\"a b\"\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET /z HTTP/1.1\nHost: a\n\n";
        let (r, state, heads, bad) = run(input);
        assert_eq!((r, state, heads, bad), (Ok(()), State::Head, 4, 0));
    }

    #[test]
    fn marks_the_head_with_both_framings() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let (r, state, heads, bad) = run(input);
        assert_eq!((r, state, heads, bad), (Ok(()), State::Head, 2, 2));
        let v = Verdicts::default();
        v.bad_head.store(2, Ordering::Relaxed);
        assert!(v.ambiguous(2) && !v.ambiguous(1));
    }

    #[test]
    fn refuses_bad_chunk_lines() {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for (body, what) in [
            (&b"3;foo\x00\r\nabc\r\n0\r\n\r\n"[..], "invalid-chunk-extension"),
            (b"3;=x\r\nabc\r\n0\r\n\r\n", "invalid-chunk-extension"),
            (b"3;a=\"x\r\nabc\r\n", "invalid-chunk-extension"),
            (b"3;a=b c\r\nabc\r\n", "invalid-chunk-extension"),
            (b"3 3\r\nabc\r\n", "invalid-chunk-extension"),
            (b"zz\r\nabc\r\n", "invalid-chunk-size"),
            (b"\r\nabc\r\n", "invalid-chunk-size"),
            (b"11111111111111111\r\n", "invalid-chunk-size"),
            (b"3\r\nabcX\r\n", "chunk-data-not-followed-by-crlf"),
        ] {
            let mut input = head.clone();
            input.extend_from_slice(body);
            assert_eq!(
                run(&input).0,
                Err(Violation(what)),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let mut long = head.clone();
        long.extend_from_slice(b"3;");
        long.extend(std::iter::repeat_n(b'a', 5000));
        assert_eq!(run(&long).0, Err(Violation("chunk-line-too-long")));
        // Whitespace around the extension parts is allowed (BWS).
        let mut ok = head;
        ok.extend_from_slice(b"3 ; a = b ;c=\"q\\\"x\"\r\nabc\r\n0\r\n\r\n");
        assert_eq!(run(&ok).0, Ok(()));
    }

    #[test]
    fn stops_watching_what_is_not_http1() {
        for input in [
            &b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello"[..],
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(run(input).1, State::Off, "{:?}", String::from_utf8_lossy(input));
        }
        let v = Arc::new(Verdicts::default());
        let mut t = Tracker::new(16, v);
        assert!(t.feed(b"GET /a-long-path HTTP/1.1\r\n").is_ok());
        assert_eq!(t.state, State::Off, "an oversized head is left to hyper's 431");
        // The offset of the offending byte is reported.
        let mut t = Tracker::new(1024, Arc::default());
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;\x00";
        assert_eq!(
            t.feed(input),
            Err((input.len() - 1, Violation("invalid-chunk-extension")))
        );
    }
}
