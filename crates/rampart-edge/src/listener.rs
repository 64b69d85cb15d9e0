//! Listeners: bind, accept, TLS handshake, and serving HTTP/1.1 and HTTP/2 on
//! each connection until it closes or graceful shutdown asks it to finish.

use crate::Shared;
use crate::metrics::ListenerLabels;
use crate::proxy::{self, ConnInfo};
use crate::security::guard::Guarded;
use crate::security::proxy_protocol::{self, Prefixed};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Plain,
    Tls,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Plain => "http",
            Kind::Tls => "https",
        }
    }
}

/// A bound listener and the switch that stops its accept loop.
pub struct ListenerHandle {
    pub spec: String,
    pub kind: Kind,
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl ListenerHandle {
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Open connections: bounded by `server.max_connections`, and awaited by shutdown.
#[derive(Default)]
pub struct ConnTracker {
    active: AtomicUsize,
    idle: Notify,
    closed: Notify,
}

/// Held by a connection's task; closing the connection drops it.
pub struct ConnGuard {
    shared: Arc<Shared>,
    gauge: Gauge,
}

impl ConnTracker {
    /// Count a connection admitted some other way (an upgraded tunnel outliving its
    /// HTTP connection), so shutdown waits for it too.
    pub fn enter(shared: &Arc<Shared>, gauge: Gauge) -> ConnGuard {
        shared.conns.active.fetch_add(1, Ordering::SeqCst);
        gauge.inc();
        ConnGuard {
            shared: shared.clone(),
            gauge,
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Take a connection slot, waiting while `max` are taken. Check and increment
    /// are one atomic step, so several listeners together never exceed `max`. A
    /// connection waiting here is accepted but not yet served, and its listener
    /// accepts nothing more until it is admitted; later clients wait in the
    /// kernel's backlog.
    async fn admit(shared: &Arc<Shared>, max: usize, gauge: Gauge) -> ConnGuard {
        let conns = &shared.conns;
        loop {
            let closed = conns.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            let cur = conns.active.load(Ordering::SeqCst);
            if cur >= max {
                closed.await;
                continue;
            }
            if conns
                .active
                .compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                gauge.inc();
                return ConnGuard {
                    shared: shared.clone(),
                    gauge,
                };
            }
        }
    }

    /// Wait until no connection is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        let conns = &self.shared.conns;
        if conns.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            conns.idle.notify_waiters();
        }
        conns.closed.notify_waiters();
    }
}

/// Bind a listening socket with `SO_REUSEADDR` and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

pub fn spawn(shared: Arc<Shared>, spec: String, kind: Kind, listener: TcpListener) -> std::io::Result<ListenerHandle> {
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let labels = ListenerLabels {
        listener: format!("{}://{}", kind.as_str(), addr),
    };
    let open = shared.metrics.open_connections.get_or_create(&labels).clone();
    let total = shared.metrics.connections.get_or_create(&labels).clone();
    tokio::spawn(accept_loop(
        shared,
        listener,
        Arc::from(spec.as_str()),
        kind,
        stop_rx,
        open,
        total,
    ));
    Ok(ListenerHandle { spec, kind, addr, stop })
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    spec: Arc<str>,
    kind: Kind,
    mut stop: watch::Receiver<bool>,
    open: Gauge,
    total: Counter,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                total.inc();
                let max = shared.snapshot.load().validated.config.server.max_connections;
                let guard = tokio::select! {
                    g = ConnTracker::admit(&shared, max, open.clone()) => g,
                    _ = stop.changed() => return,
                };
                tokio::spawn(serve_conn(shared.clone(), stream, peer, spec.clone(), kind, guard));
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// How a connection is served: plain HTTP/1.1 (hyper's `http1` connection, the
/// smallest per-connection state), or HTTP/1.1 and HTTP/2 chosen per connection.
enum Protocols {
    Http1(http1::Builder),
    Both(auto::Builder<TokioExecutor>),
}

/// The most a request head may take: hyper's read buffer and the guard's bound.
fn head_budget(snap: &crate::snapshot::Snapshot) -> usize {
    (snap.limits.max_header_bytes + snap.limits.max_uri + 4096).max(8192)
}

fn builder(shared: &Shared, kind: Kind) -> Protocols {
    let snap = shared.snapshot.load();
    let s = &snap.validated.config.server;
    let head_budget = head_budget(&snap);
    let http2 = match kind {
        Kind::Plain => s.h2c,
        Kind::Tls => s.tls.as_ref().is_some_and(|t| t.http2),
    };
    if !http2 {
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout.get())
            .max_buf_size(head_budget)
            .max_headers(snap.limits.max_headers);
        return Protocols::Http1(b);
    }
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout.get())
        .max_buf_size(head_budget)
        .max_headers(snap.limits.max_headers);
    b.http2()
        .timer(TokioTimer::new())
        // WebSocket over HTTP/2 (RFC 8441): extended CONNECT.
        .enable_connect_protocol()
        .max_header_list_size(u32::try_from(head_budget).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    Protocols::Both(b)
}

async fn serve_conn(
    shared: Arc<Shared>,
    stream: TcpStream,
    socket_peer: SocketAddr,
    spec: Arc<str>,
    kind: Kind,
    _guard: ConnGuard,
) {
    let _ = stream.set_nodelay(true);
    let mut shutdown = shared.shutdown_rx();
    let (head_budget, proxy_protocol, timeout) = {
        let snap = shared.snapshot.load();
        let s = &snap.validated.config.server;
        let pp = s.proxy_protocol.iter().any(|l| **l == *spec);
        (head_budget(&snap), pp, s.header_read_timeout.get())
    };
    // PROXY protocol: the client's address comes from a trusted proxy's header.
    let mut stream = stream;
    let (peer, prefix) = if proxy_protocol {
        let trusted = crate::headers::is_trusted(&shared.snapshot.load().trusted, socket_peer.ip());
        if !trusted {
            tracing::debug!(peer = %socket_peer, "PROXY header from an untrusted peer: closed");
            return;
        }
        match tokio::time::timeout(timeout, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok((source, rest))) => (source.unwrap_or(socket_peer), rest),
            Ok(Err(e)) => {
                tracing::debug!(peer = %socket_peer, error = e, "bad PROXY header: closed");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %socket_peer, "no PROXY header in time: closed");
                return;
            }
        }
    } else {
        (socket_peer, Vec::new())
    };
    let stream = Prefixed::new(stream, prefix);
    let info = Arc::new(ConnInfo::new(peer, kind == Kind::Tls));
    // The framing guard reads along with hyper's HTTP/1 parser (see security::guard).
    let verdicts = info.verdicts.clone();
    let svc_shared = shared.clone();
    let svc = service_fn(move |req| proxy::handle(svc_shared.clone(), info.clone(), req));
    let b = builder(&shared, kind);
    match kind {
        Kind::Plain => {
            let io = Guarded::new(stream, head_budget, verdicts);
            serve(&b, TokioIo::new(io), svc, &mut shutdown).await;
        }
        // The TLS state is large: boxed, so plain connections do not carry room for it.
        Kind::Tls => {
            let snap = shared.snapshot.load();
            let Some(cfg) = snap.tls.clone() else { return };
            drop(snap);
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            Box::pin(async move {
                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let io = Guarded::new(tls, head_budget, verdicts);
                        serve(&b, TokioIo::new(io), svc, &mut shutdown).await;
                    }
                    Ok(Err(e)) => {
                        shared.metrics.tls_handshake_failures.inc();
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        shared.metrics.tls_handshake_failures.inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            })
            .await;
        }
    }
}

async fn serve<I, S>(p: &Protocols, io: I, svc: S, shutdown: &mut watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::body::EdgeBody>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    match p {
        Protocols::Http1(b) => {
            let conn = b.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn);
            drive(conn, shutdown, |c| c.graceful_shutdown()).await;
        }
        // HTTP/1 and HTTP/2 state together is large: boxed, so HTTP/1-only
        // connections do not carry room for it.
        Protocols::Both(b) => {
            let mut conn = Box::pin(b.serve_connection_with_upgrades(io, svc));
            drive(conn.as_mut(), shutdown, |c| c.graceful_shutdown()).await;
        }
    }
}

/// Run a connection to its end; when shutdown is signalled, ask it to finish
/// gracefully (idle keep-alive connections close, in-flight requests complete).
async fn drive<C, E>(mut conn: Pin<&mut C>, shutdown: &mut watch::Receiver<bool>, graceful: fn(Pin<&mut C>))
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if *shutdown.borrow() {
        graceful(conn.as_mut());
    } else {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed() => graceful(conn.as_mut()),
        }
    }
    let _ = conn.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The task each connection runs; its future lives as long as the connection.
    #[test]
    fn the_connection_task_size() {
        fn future_size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<Shared>, TcpStream, SocketAddr, Arc<str>, Kind, ConnGuard) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = future_size(serve_conn);
        println!("serve_conn's future is {size} bytes");
        assert!(size <= 2048, "serve_conn's future is {size} bytes");
    }
}
