//! HTTP/1.1 upstream connections, pooled per backend over hyper's client connection.
//!
//! hyper-util's pooled client costs more per request than the rest of the client
//! path: it hashes a (scheme, authority) key with SipHash on every checkout and
//! return, and spawns a task per request to watch for the connection becoming idle
//! again. Measured with callgrind on a bare proxy (hyper server and client, nothing
//! else): 34.9k instructions per request through hyper-util's client, 25.6k through
//! a per-backend list of hyper `SendRequest`s. This pool is that list:
//!
//! - one bounded LIFO list of idle connections per backend (by index, no hashing);
//! - a connection goes back only when its response body was read to the end
//!   ([`Checkin`], held by the response's completion record), so a request never
//!   waits behind another client's download;
//! - a request that finds its pooled connection closed before anything was sent
//!   is sent again on a new connection, as hyper-util does;
//! - idle connections older than the pool's `idle_timeout` are dropped when a
//!   checkout finds them (or a return finds the list full), and by a reaper task
//!   that sweeps the lists every `idle_timeout` (at least every second, at most
//!   every minute) for as long as the pool exists;
//! - body-less GET and HEAD requests to plain-HTTP backends go through Rampart's
//!   own client ([`crate::h1client`]), whose connections have a list of their own.
//!
//! HTTP/2 upstreams keep hyper-util's client (one multiplexed connection).

use crate::body::{UpBody, UpstreamBody};
use crate::dns::Resolver;
use crate::h1client;
use http::{Request, Response, Uri};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tower_service::Service;

type Connector = HttpsConnector<HttpConnector<Resolver>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

thread_local! {
    /// Which worker runtime this thread runs (the per-core model); 0 elsewhere.
    static WORKER_SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Mark the calling thread as worker runtime `slot`'s.
pub(crate) fn set_worker_slot(slot: usize) {
    WORKER_SLOT.with(|s| s.set(slot));
}

/// The worker runtime the calling thread runs (0 off the per-core model).
pub(crate) fn worker_slot() -> usize {
    WORKER_SLOT.with(Cell::get)
}

pub struct H1Pool {
    connector: Connector,
    /// Idle connections per worker runtime and backend (`slot * backends + index`),
    /// most recently used last. A connection is registered with the reactor of the
    /// runtime that opened it, so each worker reuses its own.
    idle: Arc<Vec<Mutex<Lists>>>,
    backends: usize,
    slots: usize,
    max_idle: usize,
    idle_timeout: Duration,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// A backend's idle connections: hyper's, and Rampart's own client's
/// ([`crate::h1client`], for body-less GET and HEAD to plain-HTTP backends).
#[derive(Default)]
struct Lists {
    hyper: Vec<Idle>,
    /// Boxed: each keeps its box for life, so a checkout or return moves a pointer.
    #[allow(clippy::vec_box)]
    own: Vec<Box<h1client::Conn>>,
}

/// Why a request got no response.
pub enum SendError {
    /// No connection could be made (connector error: DNS, refused, timeout, TLS).
    Connect(BoxError),
    /// The connection failed with the request (reset, invalid response, ...).
    Request(hyper::Error),
    /// Rampart's own client: the connection failed.
    Io(std::io::Error),
    /// Rampart's own client: the response broke HTTP/1.1.
    Invalid(h1client::InvalidResponse),
}

impl SendError {
    pub fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            SendError::Connect(e) => e.as_ref(),
            SendError::Request(e) => e,
            SendError::Io(e) => e,
            SendError::Invalid(e) => e,
        }
    }

    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

impl std::fmt::Debug for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e:?}"),
            SendError::Request(e) => write!(f, "request: {e:?}"),
            SendError::Io(e) => write!(f, "request: {e}"),
            SendError::Invalid(e) => write!(f, "request: {e}"),
        }
    }
}

/// A request for the own client ([`h1client`]).
pub struct Own {
    /// Its head as it goes on the wire ([`h1client::encode`]), and its body, if any.
    pub head: Vec<u8>,
    /// The response's fields no stage uses may stay lines ([`h1client::Passthrough`]).
    pub passthrough: bool,
    /// When it is sent: the idle pool's clock.
    pub now: Instant,
}

/// A connection lent to one request, returned to its backend's list when the
/// response body has been read to the end.
pub struct Checkin {
    pool: Arc<crate::upstream::Pool>,
    index: usize,
    sender: SendRequest<UpstreamBody>,
}

impl Checkin {
    pub fn give_back(self) {
        if let Some(h1) = &self.pool.h1 {
            h1.put(self.index, self.sender);
        }
    }
}

impl H1Pool {
    pub fn new(connector: Connector, backends: usize, max_idle: usize, idle_timeout: Duration, slots: usize) -> H1Pool {
        let slots = slots.max(1);
        let idle: Arc<Vec<Mutex<Lists>>> =
            Arc::new((0..backends * slots).map(|_| Mutex::new(Lists::default())).collect());
        // The reaper holds the lists weakly: it ends with the pool. Built outside a
        // runtime (config checks), there is nothing to reap.
        if max_idle > 0
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let lists = Arc::downgrade(&idle);
            let every = idle_timeout.clamp(Duration::from_secs(1), Duration::from_secs(60));
            rt.spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    let Some(lists) = lists.upgrade() else { return };
                    for m in lists.iter() {
                        let mut l = crate::lock(m);
                        sweep(&mut l.hyper, idle_timeout);
                        l.own.retain(|c| c.since.elapsed() < idle_timeout);
                    }
                }
            });
        }
        H1Pool {
            connector,
            idle,
            backends,
            slots,
            max_idle,
            idle_timeout,
        }
    }

    /// Backend `index`'s idle connections of the calling thread's worker runtime.
    fn list(&self, index: usize) -> Option<MutexGuard<'_, Lists>> {
        let slot = worker_slot().min(self.slots - 1);
        Some(crate::lock(self.idle.get(slot * self.backends + index)?))
    }

    /// An idle connection to backend `index` that can take a request now.
    async fn checkout(&self, index: usize) -> Option<SendRequest<UpstreamBody>> {
        loop {
            let Idle { mut sender, since } = self.list(index)?.hyper.pop()?;
            if sender.is_closed() || since.elapsed() >= self.idle_timeout {
                continue;
            }
            if sender.is_ready() {
                return Some(sender);
            }
            // Its last response was read to the end; the connection's task may not
            // have marked it idle yet.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn put(&self, index: usize, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() || self.max_idle == 0 {
            return;
        }
        let Some(mut lists) = self.list(index) else { return };
        let list = &mut lists.hyper;
        // Expired connections are dropped at checkout and by the reaper; a full list
        // is swept first, so a stale one does not keep a fresh one out.
        if list.len() >= self.max_idle {
            sweep(list, self.idle_timeout);
        }
        if list.len() < self.max_idle {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Give back a connection of the own client whose response was read whole.
    pub(crate) fn put_own(&self, index: usize, conn: Box<h1client::Conn>) {
        if self.max_idle == 0 {
            return;
        }
        let Some(mut lists) = self.list(index) else { return };
        let list = &mut lists.own;
        if list.len() >= self.max_idle {
            let timeout = self.idle_timeout;
            list.retain(|c| c.since.elapsed() < timeout);
        }
        if list.len() < self.max_idle {
            list.push(conn);
        }
    }

    /// An idle connection of the own client to backend `index` that can take a request.
    /// `now`: the request's send time (the pool's idle times need no finer clock).
    fn checkout_own(&self, index: usize, now: Instant) -> Option<Box<h1client::Conn>> {
        loop {
            let mut conn = self.list(index)?.own.pop()?;
            if now.saturating_duration_since(conn.since) < self.idle_timeout && conn.usable() {
                return Some(conn);
            }
        }
    }

    /// A new connection to `target`: DNS, TCP and, for `https`, TLS.
    async fn dial(&self, target: &Uri) -> Result<<Connector as Service<Uri>>::Response, SendError> {
        self.connector
            .clone()
            .call(target.clone())
            .await
            .map_err(SendError::Connect)
    }

    async fn connect_own(&self, target: &Uri) -> Result<Box<h1client::Conn>, SendError> {
        match self.dial(target).await? {
            hyper_rustls::MaybeHttpsStream::Http(tcp) => Ok(h1client::Conn::new(tcp.into_inner())),
            hyper_rustls::MaybeHttpsStream::Https(_) => Err(SendError::Connect(
                "a TLS connection where plain HTTP was asked for".into(),
            )),
        }
    }

    /// A body-less GET or HEAD, or a request with a body held whole, to a
    /// plain-HTTP backend, through the own client.
    async fn send_own(
        &self,
        pool: &Arc<crate::upstream::Pool>,
        index: usize,
        target: &Uri,
        req: &Request<UpstreamBody>,
        own: &Own,
    ) -> Result<Response<UpBody>, SendError> {
        let (wire, passthrough) = (&own.head[..], own.passthrough);
        let head_request = req.method() == http::Method::HEAD;
        let idempotent = req.method().is_idempotent();
        let failed = |f: h1client::Failure| match f {
            h1client::Failure::Io(e) => SendError::Io(e),
            h1client::Failure::Invalid(e) => SendError::Invalid(e),
            h1client::Failure::Stale => SendError::Io(std::io::ErrorKind::ConnectionReset.into()),
        };
        // A pooled connection the upstream had closed gets the request again, once,
        // on a new connection: when the write failed, or, for an idempotent
        // method, when it closed with no response.
        let pooled = match self.checkout_own(index, own.now) {
            Some(conn) => match h1client::exchange(conn, wire, head_request, passthrough, idempotent).await {
                Err(h1client::Failure::Stale) => None,
                other => Some(other),
            },
            None => None,
        };
        let exchanged = match pooled {
            Some(r) => r,
            // Boxed: connecting (DNS, TCP, handshake) is the rare path.
            None => {
                let conn = Box::pin(self.connect_own(target)).await?;
                h1client::exchange(conn, wire, head_request, passthrough, idempotent).await
            }
        };
        let (parts, body) = exchanged.map_err(failed)?;
        let body = body.returning_to((pool.clone(), index));
        Ok(Response::from_parts(parts, UpBody::Own(body)))
    }

    async fn connect(&self, target: &Uri) -> Result<SendRequest<UpstreamBody>, SendError> {
        let io = self.dial(target).await?;
        let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(SendError::Request)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::trace!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Send `req` (origin-form URI, Host set) to backend `index` at `target`
    /// (scheme and authority, for connecting). With `own`, the request is one
    /// [`h1client::eligible`] takes, to a plain-HTTP target, and goes through the own
    /// client (see [`Own`]; `req`'s own head is not used).
    pub async fn send(
        &self,
        pool: &Arc<crate::upstream::Pool>,
        index: usize,
        target: &Uri,
        req: Request<UpstreamBody>,
        own: Option<Own>,
    ) -> Result<(Response<UpBody>, Option<Checkin>), SendError> {
        if let Some(own) = own {
            return self.send_own(pool, index, target, &req, &own).await.map(|r| (r, None));
        }
        let mut req = req;
        // A pooled connection the upstream closed before our request went out gets
        // the request back; it is sent again, once, on a new connection.
        if let Some(mut sender) = self.checkout(index).await {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp.map(UpBody::Hyper), Some(self.checkin(pool, index, sender)))),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        // Boxed: connecting (DNS, TCP, TLS, handshake) is the rare path.
        let mut sender = Box::pin(self.connect(target)).await?;
        let resp = sender.send_request(req).await.map_err(SendError::Request)?;
        Ok((resp.map(UpBody::Hyper), Some(self.checkin(pool, index, sender))))
    }

    fn checkin(&self, pool: &Arc<crate::upstream::Pool>, index: usize, sender: SendRequest<UpstreamBody>) -> Checkin {
        Checkin {
            pool: pool.clone(),
            index,
            sender,
        }
    }
}

/// Drop the connections that closed or outlived `timeout`.
fn sweep(list: &mut Vec<Idle>, timeout: Duration) {
    list.retain(|i| !i.sender.is_closed() && i.since.elapsed() < timeout);
}
