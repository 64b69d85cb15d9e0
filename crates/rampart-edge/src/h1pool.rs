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
//!   checkout finds them (or a return finds the list full), and by a reaper task that sweeps the lists every
//!   `idle_timeout` (at least every second, at most every minute) for as long as the
//!   pool exists.
//!
//! HTTP/2 upstreams keep hyper-util's client (one multiplexed connection).

use crate::body::UpstreamBody;
use crate::dns::Resolver;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tower_service::Service;

type Connector = HttpsConnector<HttpConnector<Resolver>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct H1Pool {
    connector: Connector,
    /// Idle connections per backend, most recently used last.
    idle: Arc<Vec<Mutex<Vec<Idle>>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// Why a request got no response.
pub enum SendError {
    /// No connection could be made (connector error: DNS, refused, timeout, TLS).
    Connect(BoxError),
    /// The connection failed with the request (reset, invalid response, ...).
    Request(hyper::Error),
}

impl SendError {
    pub fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            SendError::Connect(e) => e.as_ref(),
            SendError::Request(e) => e,
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
        }
    }
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
    pub fn new(connector: Connector, backends: usize, max_idle: usize, idle_timeout: Duration) -> H1Pool {
        let idle: Arc<Vec<Mutex<Vec<Idle>>>> = Arc::new((0..backends).map(|_| Mutex::new(Vec::new())).collect());
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
                        sweep(&mut crate::lock(m), idle_timeout);
                    }
                }
            });
        }
        H1Pool {
            connector,
            idle,
            max_idle,
            idle_timeout,
        }
    }

    fn list(&self, index: usize) -> Option<MutexGuard<'_, Vec<Idle>>> {
        Some(crate::lock(self.idle.get(index)?))
    }

    /// An idle connection to backend `index` that can take a request now.
    async fn checkout(&self, index: usize) -> Option<SendRequest<UpstreamBody>> {
        loop {
            let Idle { mut sender, since } = self.list(index)?.pop()?;
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
        let Some(mut list) = self.list(index) else { return };
        // Expired connections are dropped at checkout and by the reaper; a full list
        // is swept first, so a stale one does not keep a fresh one out.
        if list.len() >= self.max_idle {
            sweep(&mut list, self.idle_timeout);
        }
        if list.len() < self.max_idle {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, target: &Uri) -> Result<SendRequest<UpstreamBody>, SendError> {
        let io = self
            .connector
            .clone()
            .call(target.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(SendError::Request)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::trace!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Send `req` (origin-form URI, Host set) to backend `index` at `target`
    /// (scheme and authority, for connecting).
    pub async fn send(
        &self,
        pool: &Arc<crate::upstream::Pool>,
        index: usize,
        target: &Uri,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Checkin), SendError> {
        let mut req = req;
        // A pooled connection the upstream closed before our request went out gets
        // the request back; it is sent again, once, on a new connection.
        if let Some(mut sender) = self.checkout(index).await {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.checkin(pool, index, sender))),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        // Boxed: connecting (DNS, TCP, TLS, handshake) is the rare path.
        let mut sender = Box::pin(self.connect(target)).await?;
        let resp = sender.send_request(req).await.map_err(SendError::Request)?;
        Ok((resp, self.checkin(pool, index, sender)))
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
