//! Listeners: bind, accept, TLS handshake, and serving HTTP/1.1 and HTTP/2 on
//! each connection until it closes or graceful shutdown asks it to finish.

use crate::Shared;
use crate::body::ClientIn;
use crate::metrics::ListenerLabels;
use crate::park::Parked;
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
use tokio::time::Instant;

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
    /// Tasks waiting on `idle` or `closed` (shutdown; an accept loop at
    /// `max_connections`). A closing connection takes the notifiers' locks only
    /// when someone waits: never, in the common case.
    waiting: AtomicUsize,
    idle: Notify,
    closed: Notify,
}

/// Counts a waiter in [`ConnTracker::waiting`] while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
        ConnGuard::new(shared, gauge)
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
        // Below the limit: one atomic step, no waiter registered.
        if conns.try_take(max) {
            return ConnGuard::new(shared, gauge);
        }
        // Counted before the count is read again below: a connection closing after
        // that read sees the waiter and notifies.
        let _waiting = Waiting::new(&conns.waiting);
        loop {
            let closed = conns.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if conns.try_take(max) {
                return ConnGuard::new(shared, gauge);
            }
            closed.await;
        }
    }

    /// Take a connection slot if fewer than `max` are taken (check and increment
    /// in one atomic step, retried only when another listener raced in between).
    fn try_take(&self, max: usize) -> bool {
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    /// Wait until no connection is open.
    pub async fn drained(&self) {
        let _waiting = Waiting::new(&self.waiting);
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl ConnGuard {
    /// For a slot already counted in `active`.
    fn new(shared: &Arc<Shared>, gauge: Gauge) -> ConnGuard {
        gauge.inc();
        ConnGuard {
            shared: shared.clone(),
            gauge,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        let conns = &self.shared.conns;
        let was = conns.active.fetch_sub(1, Ordering::SeqCst);
        if conns.waiting.load(Ordering::SeqCst) > 0 {
            if was == 1 {
                conns.idle.notify_waiters();
            }
            conns.closed.notify_waiters();
        }
    }
}

/// Bind a listening socket with `SO_REUSEADDR` and a deep backlog; with
/// `reuse_port`, also `SO_REUSEPORT` (`server.reuse_port`). `TCP_NODELAY` is set
/// here: on Linux the connections it accepts inherit it, one system call per
/// connection fewer.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_tcp_nodelay(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// Start accepting on `listener`, in the runtime of `on` (else the current one): the
/// runtime the listener was registered with, whose tasks serve its connections.
pub fn spawn(
    shared: Arc<Shared>,
    spec: String,
    kind: Kind,
    listener: TcpListener,
    on: Option<&tokio::runtime::Handle>,
) -> std::io::Result<ListenerHandle> {
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let labels = ListenerLabels {
        listener: format!("{}://{}", kind.as_str(), addr),
    };
    let open = shared.metrics.open_connections.get_or_create(&labels).clone();
    let total = shared.metrics.connections.get_or_create(&labels).clone();
    let accepting = accept_loop(shared, listener, Arc::from(spec.as_str()), kind, stop_rx, open, total);
    match on {
        Some(h) => drop(h.spawn(accepting)),
        None => drop(tokio::spawn(accepting)),
    }
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
        // An accept that is ready is taken without registering for the stop
        // signal (a lock on its waiter list, twice per connection).
        let accepted = tokio::select! {
            biased;
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                total.inc();
                let max = shared.snapshot.load().validated.config.server.max_connections;
                let guard = tokio::select! {
                    biased;
                    g = ConnTracker::admit(&shared, max, open.clone()) => g,
                    _ = stop.changed() => return,
                };
                // Boxed first: see `Shared::spawn_conn`.
                tokio::spawn(Box::pin(serve_conn(
                    shared.clone(),
                    stream,
                    peer,
                    spec.clone(),
                    kind,
                    guard,
                )));
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The most a request head may take: hyper's read buffer and the guard's bound.
pub(crate) fn head_budget(snap: &crate::snapshot::Snapshot) -> usize {
    (snap.limits.max_header_bytes + snap.limits.max_uri + 4096).max(8192)
}

/// The HTTP/1 connection settings of a snapshot for hyper's HTTP/1 connections that
/// the lean path hands requests to: no header timer of hyper's (plain HTTP/1 times
/// heads on its parking tick, see `drive_parkable`).
fn http1_builder(snap: &crate::snapshot::Snapshot) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(head_budget(snap))
        .max_headers(snap.limits.max_headers);
    b
}

/// hyper's HTTP/2 settings, applied to the HTTP/2-only builder and to the h2c
/// builder's HTTP/2 half (two types with the same methods).
macro_rules! http2_settings {
    ($b:expr, $head_budget:expr) => {
        $b.timer(TokioTimer::new())
            // WebSocket over HTTP/2 (RFC 8441): extended CONNECT.
            .enable_connect_protocol()
            .max_header_list_size(u32::try_from($head_budget).unwrap_or(u32::MAX))
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

/// TLS connections that chose `h2` by ALPN: hyper's HTTP/2 connection alone.
fn h2_builder(shared: &Shared) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let snap = shared.snapshot.load();
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2_settings!(b, head_budget(&snap));
    b
}

/// h2c: HTTP/1.1 or HTTP/2 with prior knowledge, chosen by the connection's first
/// bytes. Boxed: the builder is large.
fn h2c_builder(shared: &Shared) -> Box<auto::Builder<TokioExecutor>> {
    let snap = shared.snapshot.load();
    let s = &snap.validated.config.server;
    let head_budget = head_budget(&snap);
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout.get())
        .max_buf_size(head_budget)
        .max_headers(snap.limits.max_headers);
    http2_settings!(b.http2(), head_budget);
    Box::new(b)
}

/// A client connection after its TLS handshake, if any.
enum Client {
    Plain(Prefixed<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>),
}

async fn serve_conn(
    shared: Arc<Shared>,
    stream: TcpStream,
    socket_peer: SocketAddr,
    spec: Arc<str>,
    kind: Kind,
    guard: ConnGuard,
) {
    // Inherited from the listening socket on Linux (see `bind`).
    #[cfg(not(target_os = "linux"))]
    let _ = stream.set_nodelay(true);
    let (head_budget, proxy_protocol, timeout, h2c) = {
        let snap = shared.snapshot.load();
        let s = &snap.validated.config.server;
        let pp = s.proxy_protocol.iter().any(|l| **l == *spec);
        (head_budget(&snap), pp, s.header_read_timeout.get(), s.h2c)
    };
    let idle_deadline = Instant::now() + timeout;
    // PROXY protocol: the client's address comes from a trusted proxy's header.
    let mut stream = stream;
    let (peer, prefix) = if proxy_protocol {
        let trusted = crate::headers::is_trusted(&shared.snapshot.load().trusted, socket_peer.ip());
        if !trusted {
            tracing::debug!(peer = %socket_peer, "PROXY header from an untrusted peer: closed");
            return;
        }
        // Boxed: the header's buffer is not kept in the task for the connection's life.
        match Box::pin(tokio::time::timeout(timeout, proxy_protocol::read_header(&mut stream))).await {
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
    if kind == Kind::Plain && !h2c {
        let (tcp, read) = stream.into_parts();
        return serve_http1(shared, tcp, read, info, guard, idle_deadline).await;
    }
    let client = match kind {
        Kind::Plain => Client::Plain(stream),
        // The TLS state is large: boxed, so plain connections do not carry room for it.
        Kind::Tls => {
            let snap = shared.snapshot.load();
            let Some(cfg) = snap.tls.clone() else { return };
            drop(snap);
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            match Box::pin(tokio::time::timeout(timeout, acceptor.accept(stream))).await {
                Ok(Ok(tls)) => Client::Tls(Box::new(tls)),
                Ok(Err(e)) => {
                    shared.metrics.tls_handshake_failures.inc();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    shared.metrics.tls_handshake_failures.inc();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let client = match client {
        // HTTP/1.1 over TLS (ALPN `http/1.1`, or none) is served as plain HTTP/1 is:
        // the lean path, hyper for the rest, and no HTTP state while idle.
        Client::Tls(tls) if tls.get_ref().1.alpn_protocol() != Some(b"h2") => {
            return Box::pin(serve_http1(shared, tls, Vec::new(), info, guard, idle_deadline)).await;
        }
        c => c,
    };
    let _guard = guard;
    let verdicts = info.verdicts.clone();
    let svc_shared = shared.clone();
    let svc = service_fn(move |req| proxy::handle(svc_shared.clone(), info.clone(), req.map(ClientIn::Hyper)));
    let mut shutdown = shared.shutdown_rx();
    match client {
        // h2c: HTTP/1 and HTTP/2 builders and state, boxed like TLS. The framing
        // guard reads along with hyper's HTTP/1 parser (see security::guard).
        Client::Plain(stream) => {
            let b = h2c_builder(&shared);
            let io = TokioIo::new(Guarded::new(stream, head_budget, verdicts.clone()));
            let mut conn = Box::pin(b.serve_connection_with_upgrades(io, svc));
            drive(conn.as_mut(), &mut shutdown, |c| c.graceful_shutdown()).await;
            if let Some(r) = verdicts.take_refusal() {
                proxy::log_refusal(&shared, peer, &r);
            }
        }
        // HTTP/2 over TLS (ALPN `h2`: HTTP/1.1 took the path above), served by
        // hyper's HTTP/2 connection alone: no protocol sniffing, no HTTP/1 state,
        // and no HTTP/1 parser for a guard to read along with. 1.9 KiB less per
        // idle connection (3,000 held: 30.5 against 28.6 KiB).
        Client::Tls(tls) => {
            let b = h2_builder(&shared);
            let mut conn = Box::pin(b.serve_connection(TokioIo::new(*tls), svc));
            drive(conn.as_mut(), &mut shutdown, |c| c.graceful_shutdown()).await;
        }
    }
}

/// How long an HTTP/1 connection must be quiet (no response in flight, no request
/// started) before it is parked; checked on a tick of this period, so a connection
/// is parked one to two periods after its last request.
const PARK_AFTER: Duration = Duration::from_millis(250);

/// A parked connection's client sent its next bytes (or closed): serve it again.
pub(crate) async fn resume(shared: Arc<Shared>, stream: std::net::TcpStream, conn: Parked, deadline: Instant) {
    match TcpStream::from_std(stream) {
        Ok(tcp) => {
            let (info, guard) = conn.resume();
            serve_http1(shared, tcp, Vec::new(), info, guard, deadline).await;
        }
        Err(e) => tracing::debug!(error = %e, "a parked connection could not be resumed: closed"),
    }
}

/// Serve a plain HTTP/1 connection: its common requests on the lean path
/// ([`crate::h1server`]), the rest with hyper, and its idle keep-alive time costing
/// only the socket.
///
/// A connection quiet for [`PARK_AFTER`] is *parked*: the socket goes to the
/// parking lot ([`crate::park`]) and this task ends; the client's next bytes start
/// a new task, on the lean path first. The lean path parks between requests.
/// hyper keeps a connection's read buffer (8 KiB), write buffer and state for the
/// connection's whole life, so a handed-off connection is parked by asking hyper to
/// end gracefully (an idle hyper connection ends at once, sending nothing); the
/// guard keeps hyper's shutdown of the socket from reaching it, and what hyper had
/// read of a next head goes back in front of the stream, to the lean path again.
/// It is parked only when the framing guard says the stream is exactly between
/// messages; otherwise it is closed, as hyper would. A connection that sends
/// nothing before `deadline` is closed.
async fn serve_http1<T: Idle>(
    shared: Arc<Shared>,
    mut io: T,
    mut read: Vec<u8>,
    info: Arc<ConnInfo>,
    guard: ConnGuard,
    mut deadline: Instant,
) {
    let mut shutdown = shared.shutdown_rx();
    let verdicts = info.verdicts.clone();
    let mut guard = guard;
    // Set when the connection is quiet at a message boundary with nothing read:
    // it waits (parks) before it is served again.
    let mut quiet = false;
    loop {
        if quiet {
            match io.park(&shared, &info, guard, deadline, &mut shutdown).await {
                Some((t, g)) => (io, guard) = (t, g),
                None => return,
            }
        }
        let lean = crate::h1server::serve(&shared, &info, io, read, &mut shutdown, PARK_AFTER, deadline);
        let stream = match Box::pin(lean).await {
            crate::h1server::Ended::Park(t, d) => {
                (io, read, deadline, quiet) = (t, Vec::new(), d, true);
                continue;
            }
            crate::h1server::Ended::Close => break,
            crate::h1server::Ended::Handoff(t, read) => Prefixed::new(t, read),
        };
        let (http1, head_budget, idle) = {
            let snap = shared.snapshot.load();
            let s = &snap.validated.config.server;
            (http1_builder(&snap), head_budget(&snap), s.header_read_timeout.get())
        };
        let svc = {
            let shared = shared.clone();
            let info = info.clone();
            service_fn(move |req| proxy::handle(shared.clone(), info.clone(), req.map(ClientIn::Hyper)))
        };
        let io_in = TokioIo::new(Guarded::new(stream, head_budget, verdicts.clone()));
        // Boxed: hyper's state is dropped when the connection is parked.
        let mut hyper_conn = Box::new(http1.serve_connection(io_in, svc).with_upgrades());
        let parkable = drive_parkable(&verdicts, &mut hyper_conn, &mut shutdown, idle, |c| {
            c.graceful_shutdown()
        });
        if !Box::pin(parkable).await {
            break;
        }
        let Some(parts) = hyper_conn.into_parts() else { break };
        verdicts.set_parking(false);
        let guarded = parts.io.into_inner();
        if !guarded.between_messages(parts.read_buf.len()) {
            break;
        }
        let (t, unread) = guarded.into_inner().into_parts();
        // hyper's connection had been quiet for a tick.
        deadline = Instant::now() + idle.saturating_sub(PARK_AFTER);
        read = parts.read_buf.to_vec();
        read.extend_from_slice(&unread);
        io = t;
        quiet = read.is_empty();
    }
    if let Some(r) = verdicts.take_refusal() {
        proxy::log_refusal(&shared, info.peer, &r);
    }
}

/// How an idle HTTP/1 client connection waits for its next request, holding as
/// little as it can: no HTTP state, no buffers.
pub(crate) trait Idle: crate::io::Transport + Sized {
    /// Wait until the client sends again (`Some`: serve it in this task) or the
    /// connection is done with here (`None`: closed at `deadline` or on shutdown,
    /// or handed to the parking lot, which serves it again in a new task).
    fn park(
        self,
        shared: &Arc<Shared>,
        info: &Arc<ConnInfo>,
        guard: ConnGuard,
        deadline: Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> impl Future<Output = Option<(Self, ConnGuard)>> + Send;
}

/// A plain connection goes to the parking lot: only its socket is kept, and this
/// task ends.
impl Idle for TcpStream {
    fn park(
        self,
        shared: &Arc<Shared>,
        info: &Arc<ConnInfo>,
        guard: ConnGuard,
        deadline: Instant,
        _: &mut watch::Receiver<bool>,
    ) -> impl Future<Output = Option<(Self, ConnGuard)>> + Send {
        shared.lot.park(self, Parked::new(info, guard), deadline);
        std::future::ready(None)
    }
}

/// How long closing an idle TLS connection may wait to send its `close_notify`.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);

/// A TLS connection keeps its session (keys and sequence numbers live in rustls),
/// so it waits in its own task, which then holds only the TLS stream and a timer.
/// Boxed: the stream (1.2 KiB) is moved between the serving loop and its parts.
impl Idle for Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>> {
    async fn park(
        mut self,
        shared: &Arc<Shared>,
        _: &Arc<ConnInfo>,
        guard: ConnGuard,
        deadline: Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(Self, ConnGuard)> {
        use crate::io::Transport;
        if *shutdown.borrow() {
            return None;
        }
        shared.metrics.parked_connections.inc();
        let woke = tokio::select! {
            r = std::future::poll_fn(|cx| self.poll_readable(cx)) => r.is_ok(),
            () = tokio::time::sleep_until(deadline) => false,
            _ = shutdown.changed() => false,
        };
        shared.metrics.parked_connections.dec();
        if woke {
            return Some((self, guard));
        }
        // Closed as nginx closes an idle TLS connection: with a `close_notify`.
        let _ = tokio::time::timeout(CLOSE_NOTIFY_WAIT, tokio::io::AsyncWriteExt::shutdown(&mut self)).await;
        None
    }
}

/// Run hyper's connection until it ends (false) or is ready to park (true): quiet
/// for a tick, nothing in flight, and the guard at a message boundary. `graceful`
/// asks it to finish, as for `drive` below.
///
/// The same tick is the header timeout (`server.header_read_timeout`) for plain
/// HTTP/1: a head that is still incomplete `header_timeout` after the tick first
/// saw it started closes the connection, as hyper's header timer would. hyper's own
/// timer is off here: it allocated and armed a timer for every request, and a
/// waiting connection's deadline is the parking lot's.
async fn drive_parkable<C>(
    verdicts: &crate::security::guard::Verdicts,
    conn: &mut Box<C>,
    shutdown: &mut watch::Receiver<bool>,
    header_timeout: Duration,
    graceful: fn(Pin<&mut C>),
) -> bool
where
    C: Future<Output = hyper::Result<()>> + Unpin,
{
    let mut tick = tokio::time::interval_at(Instant::now() + PARK_AFTER, PARK_AFTER);
    let mut heads = verdicts.heads();
    // The head in progress (by number) and when a tick first saw it.
    let mut partial: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            r = &mut **conn => {
                if let Err(e) = r {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
                return false;
            }
            _ = shutdown.changed() => {
                graceful(Pin::new(&mut **conn));
                let _ = (&mut **conn).await;
                return false;
            }
            now_at = tick.tick() => {
                let now = verdicts.heads();
                // A pipelined head waiting behind a response in flight is not late:
                // hyper reads it only after the response, as its timer would start then.
                if verdicts.in_head() && verdicts.in_flight() == 0 {
                    match partial {
                        Some((n, since)) if n == now => {
                            if now_at.duration_since(since) >= header_timeout {
                                tracing::debug!("request head not complete in time: closed");
                                return false;
                            }
                        }
                        _ => partial = Some((now, now_at)),
                    }
                } else {
                    partial = None;
                }
                let quiet = now == heads && verdicts.in_flight() == 0;
                if quiet && verdicts.at_boundary() {
                    verdicts.set_parking(true);
                    graceful(Pin::new(&mut **conn));
                    let ended = (&mut **conn).await;
                    if ended.is_err() {
                        verdicts.set_parking(false);
                    }
                    return ended.is_ok();
                }
                heads = now;
            }
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

    /// Accepted connections have `TCP_NODELAY` without a call of their own (serve_conn
    /// sets it only off Linux).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        let l = bind(SocketAddr::from(([127, 0, 0, 1], 0)), false).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(s.nodelay().unwrap());
    }

    /// The size of the future an async fn with these argument types returns.
    fn future_size<A, B, C, D, E, G, F: Future>(_: fn(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every accepted connection's task holds a `serve_conn` future (and a resumed
    /// parked one a `serve_http1` future) for the connection's life, whatever the
    /// connection turns out to speak: the large states (the lean server's with its
    /// pipeline, about 6 KiB; TLS; hyper's) are boxed where they begin, so it stays
    /// under 1 KiB (824 bytes in a release build).
    #[test]
    fn a_connection_task_is_small() {
        let size = future_size(serve_conn);
        assert!(size <= 1536, "serve_conn's future is {size} bytes");
        let resumed = future_size(serve_http1::<TcpStream>);
        assert!(resumed <= 1536, "serve_http1's future is {resumed} bytes");
    }

    #[tokio::test]
    async fn reuse_port_lets_listeners_share_an_address_and_only_then() {
        let first = bind(SocketAddr::from(([127, 0, 0, 1], 0)), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true).expect("a second SO_REUSEPORT listener on the same address");
        assert_eq!(second.local_addr().unwrap(), addr);
        assert!(bind(addr, false).is_err(), "without it, the address is taken");
        let plain = bind(SocketAddr::from(([127, 0, 0, 1], 0)), false).unwrap();
        assert!(
            bind(plain.local_addr().unwrap(), true).is_err(),
            "nor can it join one bound without it"
        );
    }

    /// The task a resumed connection runs while it is served; a parked one has
    /// no task at all.
    #[test]
    fn the_connection_task_size() {
        fn future_size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<Shared>, std::net::TcpStream, Parked, Instant) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = future_size(resume);
        println!("a resumed connection's future is {size} bytes");
        // hyper's state is boxed, and dropped when the connection parks.
        assert!(size <= 832, "{size} bytes");
        type Tls = Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>;
        fn tls_future_size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<Shared>, Tls, Vec<u8>, Arc<ConnInfo>, ConnGuard, Instant) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = tls_future_size(serve_http1::<Tls>);
        println!("a TLS HTTP/1 connection's future is {size} bytes");
        // The TLS stream is boxed: moving it between the loop's parts costs a pointer.
        assert!(size <= 832, "{size} bytes");
    }
}
