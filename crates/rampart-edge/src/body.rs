//! Body wrappers. Bodies stream, except a request body read whole first: a small
//! one of known length ([`SMALL_BODY`]), or one kept for retries (up to the replay
//! limit). One that ends with trailers streams after all, trailers included.
//!
//! - [`UpstreamBody`]: the client's request body on its way upstream, counted and
//!   cut off at the configured limit (the handler then answers 413).
//! - [`EdgeBody`]: the response body on its way to the client, with the idle and
//!   whole-request timeouts, byte counting, and the access-log/metrics record
//!   written when the body ends or is dropped.

use crate::security::guard::InFlight;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body this size or smaller, of known length, is read whole before it
/// goes upstream (by the lean HTTP/1 server, or by the pipeline for the rest);
/// a larger one streams.
pub const SMALL_BODY: usize = 16 * 1024;

/// A client's request body as the pipeline receives it: hyper's, none at all (a
/// body-less request read by the lean HTTP/1 server, [`crate::h1server`]), or a
/// small body the lean server found whole behind its head.
/// `Empty` also tells the pipeline that the head has no `Content-Length`,
/// `Transfer-Encoding`, `Upgrade` or `Expect` field: the lean server hands every
/// such request to hyper, except one `Content-Length` whose body it has (`Full`).
pub enum ClientIn {
    Hyper(Incoming),
    Empty,
    /// The whole body, exactly as long as the head's one `Content-Length` says
    /// (`None` once it has been read).
    Full(Option<Bytes>),
}

impl Body for ClientIn {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientIn::Hyper(b) => Pin::new(b).poll_frame(cx),
            ClientIn::Empty => Poll::Ready(None),
            ClientIn::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientIn::Hyper(b) => b.is_end_stream(),
            ClientIn::Empty => true,
            ClientIn::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientIn::Hyper(b) => b.size_hint(),
            ClientIn::Empty => SizeHint::with_exact(0),
            ClientIn::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Shared between a request body in flight and the handler that sent it.
pub struct RequestBodyState {
    pub bytes: AtomicU64,
    pub too_large: AtomicBool,
    pub client_error: AtomicBool,
    pub timed_out: AtomicBool,
    /// When the body last made progress, as milliseconds since `epoch`.
    progress_ms: AtomicU64,
    epoch: Instant,
}

impl RequestBodyState {
    pub fn new() -> RequestBodyState {
        RequestBodyState {
            bytes: AtomicU64::new(0),
            too_large: AtomicBool::new(false),
            client_error: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.progress_ms.store(ms, Ordering::Relaxed);
    }

    /// The last time a chunk of the body was read (or the body ended).
    pub fn last_progress(&self) -> Instant {
        self.epoch + Duration::from_millis(self.progress_ms.load(Ordering::Relaxed))
    }
}

impl Default for RequestBodyState {
    fn default() -> Self {
        Self::new()
    }
}

pub enum UpstreamBody {
    Empty,
    /// A body held in memory (kept for replay on retries).
    Full(Option<Bytes>),
    /// Boxed: the upstream request is moved many times on its way through the
    /// client, and most requests (GETs) have no body to stream; boxed, the body
    /// is 40 bytes rather than 120.
    Stream(Box<Streaming>),
}

pub struct Streaming {
    /// Bytes already read from `inner` (while deciding whether to keep the body
    /// for replay), sent first.
    prefix: Option<Bytes>,
    /// Trailers already read from `inner` (which ended with them), sent after `prefix`.
    trailers: Option<http::HeaderMap>,
    inner: ClientIn,
    limit: u64,
    state: Arc<RequestBodyState>,
    /// Longest wait for the client's next chunk (`server.client_body_timeout`).
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl UpstreamBody {
    pub fn stream(inner: ClientIn, limit: u64, state: Arc<RequestBodyState>, idle: Duration) -> UpstreamBody {
        Self::stream_after(None, None, inner, limit, state, idle)
    }

    /// Stream `inner`, sending `prefix` (bytes already read from it) first, then
    /// `trailers` (already read too, when `inner` ended with them).
    fn stream_after(
        prefix: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
        inner: ClientIn,
        limit: u64,
        state: Arc<RequestBodyState>,
        idle: Duration,
    ) -> UpstreamBody {
        UpstreamBody::Stream(Box::new(Streaming {
            prefix,
            trailers,
            inner,
            limit,
            state,
            idle,
            timer: None,
            armed: false,
        }))
    }
}

impl UpstreamBody {
    /// The bytes read so far, and whether more may follow (unread) after them.
    pub fn read_so_far(&self) -> (&[u8], bool) {
        match self {
            UpstreamBody::Empty | UpstreamBody::Full(None) => (&[], false),
            UpstreamBody::Full(Some(b)) => (b, false),
            // Trailers already read: they end the body, no data follows.
            UpstreamBody::Stream(s) => (s.prefix.as_deref().unwrap_or_default(), s.trailers.is_none()),
        }
    }
}

/// The client's request body as the pipeline holds it: not touched yet, or already
/// (partly) read by a stage that needed to see it (WAF body inspection).
pub enum ClientBody {
    Unread(ClientIn),
    Read(UpstreamBody),
}

/// Read a request body into memory while it fits in `keep` bytes, so it can be
/// replayed on retries. The request body limit and the client body timeout apply.
/// Returns the whole body, or, when it is longer than `keep`, a body that sends the
/// bytes read so far and then streams the rest (and cannot be replayed).
pub async fn buffer_for_replay(
    mut inner: ClientIn,
    keep: usize,
    limit: u64,
    state: Arc<RequestBodyState>,
    idle: Duration,
) -> Result<UpstreamBody, BufferError> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, inner.frame()).await {
            Err(_) => {
                state.timed_out.store(true, Ordering::Relaxed);
                return Err(BufferError::Timeout);
            }
            Ok(None) => return Ok(UpstreamBody::Full(Some(buf.freeze()).filter(|b| !b.is_empty()))),
            Ok(Some(Err(_))) => {
                state.client_error.store(true, Ordering::Relaxed);
                return Err(BufferError::Client);
            }
            Ok(Some(Ok(f))) => f,
        };
        state.touch();
        let data = match frame.into_data() {
            Ok(data) => data,
            // Trailers end the body. A body held whole has none, so this one is sent
            // as a stream: what was read, then the trailers (it is not replayed).
            Err(frame) => {
                let Ok(trailers) = frame.into_trailers() else { continue };
                let read = Some(buf.freeze()).filter(|b| !b.is_empty());
                return Ok(UpstreamBody::stream_after(
                    read,
                    Some(trailers),
                    inner,
                    limit,
                    state,
                    idle,
                ));
            }
        };
        let n = state.bytes.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
        if n > limit {
            state.too_large.store(true, Ordering::Relaxed);
            return Err(BufferError::TooLarge);
        }
        buf.extend_from_slice(&data);
        if buf.len() > keep {
            return Ok(UpstreamBody::stream_after(
                Some(buf.freeze()),
                None,
                inner,
                limit,
                state,
                idle,
            ));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferError {
    TooLarge,
    Timeout,
    Client,
}

#[derive(Debug)]
pub struct BodyTooLarge;
impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body exceeds the configured limit")
    }
}
impl std::error::Error for BodyTooLarge {}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let (inner, limit, state, idle, timer, armed) = match self.get_mut() {
            UpstreamBody::Empty => return Poll::Ready(None),
            UpstreamBody::Full(b) => {
                return Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))));
            }
            UpstreamBody::Stream(s) if s.prefix.is_some() => {
                return Poll::Ready(s.prefix.take().map(|b| Ok(Frame::data(b))));
            }
            UpstreamBody::Stream(s) if s.trailers.is_some() => {
                return Poll::Ready(s.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            UpstreamBody::Stream(s) => {
                let Streaming {
                    inner,
                    limit,
                    state,
                    idle,
                    timer,
                    armed,
                    ..
                } = &mut **s;
                (inner, limit, state, idle, timer, armed)
            }
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *armed = false;
                state.touch();
                if let Some(d) = frame.data_ref() {
                    let n = state.bytes.fetch_add(d.len() as u64, Ordering::Relaxed) + d.len() as u64;
                    if n > *limit {
                        state.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                state.client_error.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                state.touch();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let at = Instant::now() + *idle;
                if !*armed {
                    match timer {
                        Some(t) => t.as_mut().reset(at),
                        None => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    *armed = true;
                }
                if let Some(t) = timer
                    && t.as_mut().poll(cx).is_ready()
                {
                    state.timed_out.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout("client body timeout")))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            UpstreamBody::Stream(s) => s.prefix.is_none() && s.trailers.is_none() && s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Stream(s) => {
                // The prefix was read from `inner`, whose hint now covers only the rest.
                let rest = s.inner.size_hint();
                let p = s.prefix.as_ref().map_or(0, |b| b.len() as u64);
                let mut h = SizeHint::new();
                if let Some(u) = rest.upper() {
                    h.set_upper(u.saturating_add(p));
                }
                h.set_lower(rest.lower().saturating_add(p));
                h
            }
        }
    }
}

/// A response body from upstream: hyper's, or Rampart's own HTTP/1 client's
/// ([`crate::h1client`]).
pub enum UpBody {
    Hyper(Incoming),
    Own(crate::h1client::Body),
}

impl UpBody {
    /// Header lines the response head passes on as they came (own client only).
    pub fn take_passthrough(&mut self) -> Option<Box<crate::h1client::Passthrough>> {
        match self {
            UpBody::Own(b) => b.take_passthrough(),
            UpBody::Hyper(_) => None,
        }
    }

    /// The same lines, to add the proxy's own fields to.
    pub fn passthrough_mut(&mut self) -> Option<&mut crate::h1client::Passthrough> {
        match self {
            UpBody::Own(b) => b.passthrough_mut(),
            UpBody::Hyper(_) => None,
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::Hyper(b) => Pin::new(b).poll_frame(cx).map(|o| o.map(|r| r.map_err(BoxError::from))),
            UpBody::Own(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Hyper(b) => b.is_end_stream(),
            UpBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Hyper(b) => b.size_hint(),
            UpBody::Own(b) => b.size_hint(),
        }
    }
}

/// What happened to a response body; reported to [`Completion::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyOutcome {
    Complete,
    IdleTimeout,
    RequestTimeout,
    UpstreamError,
    /// The client went away before the body ended.
    Aborted,
}

/// Called once when a response body ends, fails, or is dropped.
pub trait Completion: Send + 'static {
    fn finish(self: Box<Self>, outcome: BodyOutcome, bytes_out: u64);
}

enum Kind {
    Upstream(UpBody),
    Full(Option<Bytes>),
}

/// Collects a response body for the cache while it streams to the client; hands it
/// over only if the body completes within the size limit.
pub struct Fill {
    buf: bytes::BytesMut,
    limit: usize,
    done: Box<dyn FnOnce(Bytes) + Send>,
}

impl Fill {
    pub fn new(limit: usize, done: Box<dyn FnOnce(Bytes) + Send>) -> Fill {
        Fill {
            buf: bytes::BytesMut::new(),
            limit,
            done,
        }
    }
}

pub struct EdgeBody {
    kind: Kind,
    /// Boxed: only cache fills have one, and every response moves through hyper.
    fill: Option<Box<Fill>>,
    idle: Duration,
    deadline: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    bytes: u64,
    done: Option<Box<dyn Completion>>,
    in_flight: Option<InFlight>,
}

#[derive(Debug)]
pub struct BodyTimeout(&'static str);
impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for BodyTimeout {}

impl EdgeBody {
    pub fn full(b: impl Into<Bytes>) -> EdgeBody {
        let b: Bytes = b.into();
        EdgeBody {
            kind: Kind::Full(if b.is_empty() { None } else { Some(b) }),
            fill: None,
            idle: Duration::ZERO,
            deadline: None,
            timer: None,
            armed: false,
            bytes: 0,
            done: None,
            in_flight: None,
        }
    }

    pub fn empty() -> EdgeBody {
        EdgeBody::full(Bytes::new())
    }

    /// Stream an upstream body with an idle timeout between frames and an optional deadline.
    pub fn upstream(inner: UpBody, idle: Duration, deadline: Option<Instant>) -> EdgeBody {
        EdgeBody {
            kind: Kind::Upstream(inner),
            fill: None,
            idle,
            deadline,
            timer: None,
            armed: false,
            bytes: 0,
            done: None,
            in_flight: None,
        }
    }

    /// Header lines of the upstream's head to write as they came: only for a
    /// response the lean HTTP/1 server writes (see [`crate::h1client::Passthrough`]).
    pub fn take_passthrough(&mut self) -> Option<Box<crate::h1client::Passthrough>> {
        match &mut self.kind {
            Kind::Upstream(u) => u.take_passthrough(),
            Kind::Full(_) => None,
        }
    }

    /// Also collect the body for the cache.
    pub fn fill(mut self, f: Fill) -> EdgeBody {
        self.fill = Some(Box::new(f));
        self
    }

    pub fn on_complete(mut self, c: Box<dyn Completion>) -> EdgeBody {
        self.done = Some(c);
        self
    }

    /// Count this response as in flight on its connection until the body is dropped.
    pub fn in_flight(mut self, g: InFlight) -> EdgeBody {
        self.in_flight = Some(g);
        self
    }

    /// The body ended whole: give what was collected to the cache.
    fn deliver_fill(&mut self) {
        if let Some(f) = self.fill.take() {
            (f.done)(f.buf.freeze());
        }
    }

    fn finish(&mut self, outcome: BodyOutcome) {
        if let Some(c) = self.done.take() {
            c.finish(outcome, self.bytes);
        }
    }

    /// Arm the timer for the current wait: the nearer of idle expiry and the deadline.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<BodyOutcome> {
        if !self.armed {
            let now = Instant::now();
            let mut at = now + self.idle;
            if let Some(d) = self.deadline {
                at = at.min(d);
            }
            match &mut self.timer {
                Some(t) => t.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed = true;
        }
        match &mut self.timer {
            Some(t) => {
                ready!(t.as_mut().poll(cx));
                let expired_deadline = self.deadline.is_some_and(|d| Instant::now() >= d);
                Poll::Ready(if expired_deadline {
                    BodyOutcome::RequestTimeout
                } else {
                    BodyOutcome::IdleTimeout
                })
            }
            None => Poll::Pending,
        }
    }
}

impl Body for EdgeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(inner) => Pin::new(inner).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                    if let Some(f) = &mut this.fill {
                        if f.buf.len() + d.len() > f.limit {
                            // Too large to store: stop collecting, keep streaming.
                            this.fill = None;
                        } else {
                            f.buf.extend_from_slice(d);
                        }
                    }
                }
                // hyper stops polling once the body says it has ended (a known
                // length fully read), so hand the fill over now rather than at `None`.
                if this.is_end_stream() {
                    this.deliver_fill();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(BodyOutcome::UpstreamError);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.deliver_fill();
                this.finish(BodyOutcome::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.idle.is_zero() && this.deadline.is_none() {
                    return Poll::Pending;
                }
                match this.poll_timer(cx) {
                    Poll::Ready(outcome) => {
                        this.finish(outcome);
                        let msg = if outcome == BodyOutcome::RequestTimeout {
                            "upstream request timeout"
                        } else {
                            "upstream body idle timeout"
                        };
                        Poll::Ready(Some(Err(Box::new(BodyTimeout(msg)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(i) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(i) => i.size_hint(),
        }
    }
}

impl Drop for EdgeBody {
    fn drop(&mut self) {
        // A body dropped with nothing left to send (e.g. HEAD, 304) still completed.
        let outcome = if self.is_end_stream() {
            self.deliver_fill();
            BodyOutcome::Complete
        } else {
            BodyOutcome::Aborted
        };
        self.finish(outcome);
    }
}
