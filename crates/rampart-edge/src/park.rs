//! The parking lot: idle plain HTTP/1 keep-alive connections kept as bare
//! sockets in one epoll set, instead of a task each.
//!
//! A connection with nothing in flight and no request started is *parked*
//! (see `listener::serve_http1`): its hyper state is dropped and its socket comes
//! here. What it keeps is the socket, its `ConnInfo` (peer, request count, the
//! framing guard's verdicts) and its slot in the connection count; about a
//! hundred bytes in a slab entry, with no task, no timer and no tokio
//! registration. One task per edge watches every parked socket through a `mio`
//! poll, itself registered in tokio's reactor: when a client sends its next
//! bytes (or closes), the socket leaves the lot and a task serves it again. A
//! parked connection that stays quiet until its deadline
//! (`server.header_read_timeout`) is closed, and shutdown closes them all at once.

use crate::Shared;
use crate::listener::ConnGuard;
use crate::proxy::ConnInfo;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use prometheus_client::metrics::gauge::Gauge;
use slab::Slab;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// What a parked connection keeps besides its socket, to be served again: no
/// heap allocation of its own, so parked connections pin no freed memory.
pub struct Parked {
    pub peer: SocketAddr,
    /// Requests served on the connection so far (for the keep-alive limit and the
    /// framing guard's head numbering).
    pub requests: u64,
    /// The connection's slot in `server.max_connections` (and shutdown's wait).
    pub guard: ConnGuard,
}

impl Parked {
    /// Park a plain HTTP/1 connection with nothing in flight.
    pub fn new(info: &ConnInfo, guard: ConnGuard) -> Parked {
        Parked {
            peer: info.peer,
            requests: info.requests(),
            guard,
        }
    }

    /// The connection's state to serve it again.
    pub fn resume(self) -> (Arc<ConnInfo>, ConnGuard) {
        (Arc::new(ConnInfo::resumed(self.peer, self.requests)), self.guard)
    }
}

struct Entry {
    stream: std::net::TcpStream,
    conn: Parked,
    deadline: Instant,
}

struct State {
    entries: Slab<Entry>,
    /// When the lot's task next looks for expired connections.
    next_expiry: Option<Instant>,
    /// Shutdown has closed the lot: nothing more is parked.
    closed: bool,
}

/// Expired connections are closed in batches at most this often (and so up to
/// this late), so a steady stream of expiries does not rescan the lot each time.
const EXPIRY_BATCH: Duration = Duration::from_millis(100);

/// Readiness events taken from the poll per call.
const EVENTS: usize = 256;

pub struct Lot {
    registry: Registry,
    state: Mutex<State>,
    /// Wakes the lot's task when a parked connection's deadline comes before the
    /// one it sleeps towards.
    wake: Notify,
    gauge: Gauge,
}

impl Lot {
    /// The lot and the poll its task will watch (see [`spawn`]).
    pub fn new(gauge: Gauge) -> std::io::Result<(Arc<Lot>, Poll)> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let lot = Lot {
            registry,
            state: Mutex::new(State {
                entries: Slab::new(),
                next_expiry: None,
                closed: false,
            }),
            wake: Notify::new(),
            gauge,
        };
        Ok((Arc::new(lot), poll))
    }

    /// Park a connection until its client sends or closes, or until `deadline`.
    /// A connection that cannot be parked (the lot is closed, the socket cannot
    /// be registered) is closed.
    pub fn park(&self, stream: tokio::net::TcpStream, conn: Parked, deadline: Instant) {
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot park a connection: closed");
                return;
            }
        };
        let mut st = crate::lock(&self.state);
        if st.closed {
            return;
        }
        let slot = st.entries.vacant_entry();
        // Edge-triggered: bytes that arrived before this registration are reported
        // at once, so none are missed between hyper and the lot.
        let registered = self.registry.register(
            &mut SourceFd(&stream.as_raw_fd()),
            Token(slot.key()),
            Interest::READABLE,
        );
        if let Err(e) = registered {
            tracing::debug!(error = %e, "cannot park a connection: closed");
            return;
        }
        slot.insert(Entry { stream, conn, deadline });
        self.gauge.inc();
        let sooner = st.next_expiry.is_none_or(|t| deadline < t);
        if sooner {
            st.next_expiry = Some(deadline);
        }
        drop(st);
        if sooner {
            self.wake.notify_one();
        }
    }

    /// Take the connections whose sockets became ready out of the lot.
    fn take_ready(&self, events: &Events) -> Vec<Entry> {
        let mut st = crate::lock(&self.state);
        let mut out = Vec::with_capacity(events.iter().count());
        for ev in events {
            if let Some(e) = st.entries.try_remove(ev.token().0) {
                let _ = self.registry.deregister(&mut SourceFd(&e.stream.as_raw_fd()));
                out.push(e);
            }
        }
        drop(st);
        self.gauge.dec_by(i64::try_from(out.len()).unwrap_or(i64::MAX));
        out
    }

    /// Take the connections past their deadline out of the lot (to be closed),
    /// and set when to look next.
    fn take_expired(&self, now: Instant) -> Vec<Entry> {
        let mut st = crate::lock(&self.state);
        let expired: Vec<usize> = st
            .entries
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        let out: Vec<Entry> = expired.into_iter().filter_map(|k| st.entries.try_remove(k)).collect();
        st.next_expiry = st
            .entries
            .iter()
            .map(|(_, e)| e.deadline)
            .min()
            .map(|d| d.max(now + EXPIRY_BATCH));
        drop(st);
        self.gauge.dec_by(i64::try_from(out.len()).unwrap_or(i64::MAX));
        out
    }

    /// Close every parked connection and park no more.
    fn close(&self) {
        let mut st = crate::lock(&self.state);
        st.closed = true;
        st.next_expiry = None;
        let all: Vec<Entry> = st.entries.drain().collect();
        drop(st);
        self.gauge.dec_by(i64::try_from(all.len()).unwrap_or(i64::MAX));
        // Dropped here, outside the lock: the sockets close, the slots are given back.
        drop(all);
    }
}

/// Start the lot's task: it serves ready connections again, closes expired ones,
/// and closes them all at shutdown.
pub fn spawn(shared: &Arc<Shared>, poll: Poll) {
    let lot = shared.lot.clone();
    let weak = Arc::downgrade(shared);
    let shutdown = shared.shutdown_rx();
    tokio::spawn(async move {
        if let Err(e) = run(&lot, weak, poll, shutdown).await {
            tracing::error!(error = %e, "the parking lot failed; idle connections are closed");
        }
        lot.close();
    });
}

async fn run(lot: &Lot, weak: Weak<Shared>, poll: Poll, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    // SAFETY: the fd is the poll's own epoll instance, open from `Poll::new` until
    // the poll is dropped, which is when this AsyncFd drops (`into_inner` is never
    // called); `as_raw_fd` returns that same fd every time.
    let mut fd = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut events = Events::with_capacity(EVENTS);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let next = crate::lock(&lot.state).next_expiry;
        let expiry = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = ready?;
                loop {
                    match guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                    if events.is_empty() {
                        // Cleared only if nothing became ready since this guard was
                        // taken (tokio compares readiness ticks), so no event is lost.
                        guard.clear_ready();
                        break;
                    }
                    let ready = lot.take_ready(&events);
                    let Some(shared) = weak.upgrade() else { return Ok(()) };
                    for e in ready {
                        shared.spawn_conn(crate::listener::resume(shared.clone(), e.stream, e.conn, e.deadline));
                    }
                }
            }
            () = expiry => drop(lot.take_expired(Instant::now())),
            () = lot.wake.notified() => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}
