//! Rampart's data plane. The pipeline lives in [`proxy`]; the running
//! configuration is an immutable [`snapshot::Snapshot`] swapped atomically on
//! reload; [`listener`] accepts connections; [`admin`] serves health, metrics
//! and the admin API.

pub mod access_log;
pub mod admin;
pub mod affinity;
pub mod analyser;
pub mod balance;
pub mod body;
pub mod cache;
pub mod chain;
pub mod dns;
pub mod h1client;
pub mod h1pool;
mod h1server;
pub mod headers;
pub mod health;
mod io;
pub mod listener;
pub mod metrics;
pub mod park;
pub mod proxy;
pub mod reason;
pub mod routing;
pub mod security;
pub mod snapshot;
mod timer;
pub mod tls;
pub mod upstream;
pub mod workers;

use access_log::{AccessLog, Target};
use arc_swap::ArcSwap;
use listener::{ConnTracker, Kind, ListenerHandle};
use metrics::{Metrics, ResultLabels};
use rampart_config::{ConfigErrors, FieldError, Validated};
use snapshot::Snapshot;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Lock a mutex, recovering the data if a thread panicked while holding it (every
/// structure guarded this way stays consistent between its operations).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// State shared by every connection and the admin API. What must survive a
/// reload lives here; what a reload replaces lives in the snapshot.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Per-backend runtime state (in flight, drain/disable), keyed by (pool, URL).
    pub backends: upstream::BackendRegistry,
    /// Provider health by chain, provider and scope (kept across reloads).
    pub chain_health: chain::HealthStore,
    /// The last route traces of chain decisions.
    pub traces: chain::TraceStore,
    /// Recommendations, decisions and the audit log.
    pub control: analyser::Control,
    /// The HTTP cache's memory tier (sized at start).
    pub cache: cache::Store,
    /// Failed admin authentications per client IP (lockouts).
    pub admin_throttle: admin::AuthThrottle,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    pub ready: AtomicBool,
    pub conns: ConnTracker,
    /// Idle plain HTTP/1 connections, kept as bare sockets.
    pub lot: Arc<park::Lot>,
    config_path: Option<PathBuf>,
    shutdown: watch::Sender<bool>,
    listeners: Mutex<Vec<ListenerHandle>>,
    reload_lock: tokio::sync::Mutex<()>,
    me: std::sync::Weak<Shared>,
    /// With the per-core runtime model, the worker runtimes: each listens on its own
    /// `SO_REUSEPORT` sockets and serves the connections it accepts. Empty: the
    /// runtime the edge was started in does everything.
    workers: Vec<tokio::runtime::Handle>,
    /// Where the next resumed parked connection goes, among `workers`.
    next_worker: std::sync::atomic::AtomicUsize,
}

/// What a successful reload reports.
pub struct Reloaded {
    pub version: u64,
    pub hash: String,
    pub warnings: Vec<String>,
}

impl Shared {
    /// Run a connection's task: on the next worker runtime (round robin), or on the
    /// current runtime when there are none.
    ///
    /// The future is boxed first. tokio moves the future it is given about ten times
    /// on its way into the task (callgrind: ten copies of a connection's 824-byte
    /// future per new connection); a box moves as a pointer.
    pub(crate) fn spawn_conn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let task = Box::pin(task);
        if self.workers.is_empty() {
            drop(tokio::spawn(task));
        } else {
            let i = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len();
            drop(self.workers[i].spawn(task));
        }
    }

    pub fn me_weak(&self) -> std::sync::Weak<Shared> {
        self.me.clone()
    }

    pub fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn listener_list(&self) -> Vec<(String, &'static str, SocketAddr)> {
        self.listeners
            .lock()
            .map(|l| l.iter().map(|h| (h.spec.clone(), h.kind.as_str(), h.addr)).collect())
            .unwrap_or_default()
    }

    /// Re-read the config file, validate it whole, then swap it in. A bad config
    /// changes nothing and comes back as the same errors `rampart check` prints.
    pub async fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        let _serial = self.reload_lock.lock().await;
        let result = self.reload_inner().await;
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .reloads
            .get_or_create(&ResultLabels { result: label })
            .inc();
        match &result {
            Ok(r) => tracing::info!(version = r.version, hash = %r.hash, "configuration reloaded"),
            Err(e) => {
                tracing::error!(errors = %e, "configuration reload rejected; the running configuration is unchanged")
            }
        }
        result
    }

    async fn reload_inner(&self) -> Result<Reloaded, ConfigErrors> {
        let Some(path) = &self.config_path else {
            return Err(ConfigErrors(vec![FieldError::new(
                "",
                "this edge was not started from a config file",
            )]));
        };
        let validated = rampart_config::load_file(path)?;
        let old = self.snapshot.load_full();
        // Reloads are serialised, so the next version follows the running one.
        let version = old.version + 1;
        let mut snap = Snapshot::build(validated, version, &self.metrics, &self.backends, Some(&old))?;
        let Some(me) = self.me.upgrade() else {
            return Err(ConfigErrors(vec![FieldError::new("", "edge is shutting down")]));
        };

        // The admin listener is bound once at start. A reload that would add, move or
        // remove it is refused: applying the rest would leave the running listener
        // with a token (or none) the operator no longer expects.
        let was = old.validated.config.admin.as_ref().map(|a| a.listen.as_str());
        let now = snap.validated.config.admin.as_ref().map(|a| a.listen.as_str());
        if was != now {
            return Err(ConfigErrors(vec![FieldError::new(
                "admin.listen",
                format!(
                    "the admin listener cannot be added, moved or removed by a reload (running: {}, new: {}); restart the edge",
                    was.unwrap_or("none"),
                    now.unwrap_or("none")
                ),
            )]));
        }

        // Bind what is new before swapping, so a bind failure changes nothing.
        let wanted = listener_specs(&snap.validated);
        let reuse_port = snap.validated.config.server.reuse_port;
        let current: Vec<(String, Kind)> = self
            .listeners
            .lock()
            .map(|l| l.iter().map(|h| (h.spec.clone(), h.kind)).collect())
            .unwrap_or_default();
        let mut fresh = Vec::new();
        let mut errs = ConfigErrors::default();
        for (path, spec, kind) in &wanted {
            if current.iter().any(|(s, k)| s == spec && k == kind) {
                continue;
            }
            match spec
                .parse::<SocketAddr>()
                .map_err(|e| e.to_string())
                .and_then(|a| bind_listeners(a, reuse_port, &self.workers).map_err(|e| e.to_string()))
            {
                Ok(ls) => fresh.extend(ls.into_iter().map(|(l, on)| (spec.clone(), *kind, l, on))),
                Err(e) => errs.push(path.clone(), format!("cannot listen on {spec}: {e}")),
            }
        }
        errs.into_result(())?;

        snap.log = if snap.validated.config.log.access == old.validated.config.log.access {
            old.log.clone()
        } else {
            let log = open_access_log(&snap.validated, &self.metrics)
                .map_err(|e| ConfigErrors(vec![FieldError::new("log.access", e.to_string())]))?;
            Arc::new(log)
        };

        let report = Reloaded {
            version,
            hash: snap.validated.hash.clone(),
            warnings: snap.validated.warnings.clone(),
        };
        let keep = snap.backend_keys();
        let fresh_pools: Vec<Arc<upstream::Pool>> = snap
            .pools
            .iter()
            .filter(|(name, p)| old.pools.get(*name).is_none_or(|o| !Arc::ptr_eq(o, p)))
            .map(|(_, p)| p.clone())
            .collect();
        self.snapshot.store(Arc::new(snap));
        self.backends.retain(&keep);
        // Pools carried over keep their checkers; new or rebuilt ones get theirs.
        for p in &fresh_pools {
            health::spawn_checker(self.me.clone(), p);
        }

        let mut handles = crate::lock(&self.listeners);
        handles.retain(|h| {
            let keep = wanted.iter().any(|(_, s, k)| *s == h.spec && *k == h.kind);
            if !keep {
                tracing::info!(listen = %h.spec, kind = h.kind.as_str(), "listener removed");
                h.stop();
            }
            keep
        });
        for (spec, kind, l, on) in fresh {
            match listener::spawn(me.clone(), spec.clone(), kind, l, on.as_ref()) {
                Ok(h) => {
                    tracing::info!(listen = %spec, address = %h.addr, kind = kind.as_str(), "listener added");
                    handles.push(h);
                }
                Err(e) => tracing::error!(listen = %spec, error = %e, "listener could not start"),
            }
        }
        Ok(report)
    }
}

/// Bind `addr` for each worker runtime, registered with that runtime, with
/// `SO_REUSEPORT` and all on the first one's port (`addr` may ask for port 0); or,
/// with no workers, once, in the current runtime.
fn bind_listeners(
    addr: SocketAddr,
    reuse_port: bool,
    workers: &[tokio::runtime::Handle],
) -> std::io::Result<Vec<(tokio::net::TcpListener, Option<tokio::runtime::Handle>)>> {
    if workers.is_empty() {
        return Ok(vec![(listener::bind(addr, reuse_port)?, None)]);
    }
    let mut at = addr;
    let mut out = Vec::with_capacity(workers.len());
    for w in workers {
        let _in = w.enter();
        let l = listener::bind(at, true)?;
        at = l.local_addr()?;
        out.push((l, Some(w.clone())));
    }
    Ok(out)
}

/// `(field path, address, kind)` for every listener a config asks for.
fn listener_specs(v: &Validated) -> Vec<(String, String, Kind)> {
    let s = &v.config.server;
    let mut out: Vec<(String, String, Kind)> = s
        .listen
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("server.listen[{i}]"), l.clone(), Kind::Plain))
        .collect();
    if let Some(t) = &s.tls {
        out.extend(
            t.listen
                .iter()
                .enumerate()
                .map(|(i, l)| (format!("server.tls.listen[{i}]"), l.clone(), Kind::Tls)),
        );
    }
    out
}

fn open_access_log(v: &Validated, metrics: &Metrics) -> std::io::Result<AccessLog> {
    let target = match v.config.log.access.as_str() {
        "off" => Target::Off,
        "stdout" => Target::Stdout,
        p => Target::File(v.resolve_path(p)),
    };
    AccessLog::open(target, metrics.access_log_dropped.clone())
}

/// Build everything a config needs without binding anything: what `rampart check`
/// runs after validation, so certificate and CA problems are caught too.
pub fn check(v: Validated) -> Result<String, ConfigErrors> {
    let summary = v.summary();
    let metrics = Metrics::new();
    Snapshot::build(v, 1, &metrics, &upstream::BackendRegistry::default(), None).map(|_| summary)
}

/// A running edge.
pub struct Edge {
    shared: Arc<Shared>,
    admin_addr: Option<SocketAddr>,
    admin_stop: watch::Sender<bool>,
}

/// What graceful shutdown saw.
#[derive(Debug)]
pub struct ShutdownReport {
    /// Connections still open when the deadline passed (closed forcibly).
    pub abandoned: usize,
}

impl Edge {
    /// Build the first snapshot, bind every listener and the admin API, and start serving.
    pub async fn start(validated: Validated, config_path: Option<PathBuf>) -> anyhow::Result<Edge> {
        Self::start_on(validated, config_path, Vec::new()).await
    }

    /// Start with the per-core runtime model: every listener is bound once per worker
    /// runtime (with `SO_REUSEPORT`) and served there; the runtime this is called in
    /// keeps the admin listener, health checks and the parking lot. With no workers,
    /// the same as [`Edge::start`].
    pub async fn start_on(
        validated: Validated,
        config_path: Option<PathBuf>,
        workers: Vec<tokio::runtime::Handle>,
    ) -> anyhow::Result<Edge> {
        let metrics = Metrics::new();
        for w in &validated.warnings {
            tracing::warn!("{w}");
        }
        let admin_cfg = validated.config.admin.clone();
        let backends = upstream::BackendRegistry::with_worker_slots(workers.len());
        let mut snap = Snapshot::build(validated, 1, &metrics, &backends, None).map_err(|e| anyhow::anyhow!("{e}"))?;
        snap.log = Arc::new(open_access_log(&snap.validated, &metrics)?);
        let data_dir = snap
            .validated
            .config
            .server
            .data_dir
            .as_deref()
            .map(|d| snap.validated.resolve_path(d));
        let control = analyser::Control::open(data_dir)
            .map_err(|e| anyhow::anyhow!("server.data_dir: cannot open the decisions store: {e}"))?;
        let chain_health = chain::HealthStore::default();
        let cs = &snap.validated.config.cache;
        let cache_stats = metrics.cache_stats();
        let cache = cache::Store::new(
            cs.memory_size.bytes(),
            cs.max_object_size.as_usize(),
            cs.heuristic_max.get(),
            &cs.tag_header,
            cache_stats.clone(),
            match &cs.disk_dir {
                Some(d) => Some(
                    cache::disk::Disk::open(
                        snap.validated.resolve_path(d),
                        cs.disk_size.bytes(),
                        cache_stats.disk_evicted.clone(),
                    )
                    .map_err(|e| anyhow::anyhow!("cache.disk_dir: cannot open {d}: {e}"))?,
                ),
                None => None,
            },
        );
        control.restore(&chain_health);
        let wanted = listener_specs(&snap.validated);
        let reuse_port = snap.validated.config.server.reuse_port;
        let (shutdown, _) = watch::channel(false);
        let (lot, lot_poll) = park::Lot::new(metrics.parked_connections.clone())?;
        let shared = Arc::new_cyclic(|me| Shared {
            snapshot: ArcSwap::from_pointee(snap),
            backends,
            chain_health,
            traces: chain::TraceStore::default(),
            control,
            cache,
            admin_throttle: admin::AuthThrottle::default(),
            metrics,
            started: Instant::now(),
            ready: AtomicBool::new(false),
            conns: ConnTracker::default(),
            lot,
            config_path,
            shutdown,
            listeners: Mutex::new(Vec::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            me: me.clone(),
            workers,
            next_worker: std::sync::atomic::AtomicUsize::new(0),
        });

        park::spawn(&shared, lot_poll);
        // Each worker runtime's thread learns its slot before it accepts anything (a
        // current-thread runtime runs its tasks in the order they were spawned).
        for (i, w) in shared.workers.iter().enumerate() {
            drop(w.spawn(async move { h1pool::set_worker_slot(i) }));
        }

        let mut bound = Vec::new();
        for (_, spec, kind) in &wanted {
            let addr: SocketAddr = spec.parse()?;
            let ls = bind_listeners(addr, reuse_port, &shared.workers)
                .map_err(|e| anyhow::anyhow!("cannot listen on {spec}: {e}"))?;
            bound.extend(ls.into_iter().map(|(l, on)| (spec.clone(), *kind, l, on)));
        }
        let mut handles = Vec::new();
        for (spec, kind, l, on) in bound {
            let h = listener::spawn(shared.clone(), spec, kind, l, on.as_ref())?;
            tracing::info!(address = %h.addr, kind = kind.as_str(), "listening");
            handles.push(h);
        }
        if let Ok(mut l) = shared.listeners.lock() {
            *l = handles;
        }

        let (admin_stop, mut admin_stop_rx) = watch::channel(false);
        let admin_addr = match admin_cfg {
            Some(a) => {
                let addr: SocketAddr = a.listen.parse()?;
                let l =
                    listener::bind(addr, false).map_err(|e| anyhow::anyhow!("cannot listen on {addr} (admin): {e}"))?;
                let local = l.local_addr()?;
                let app = admin::router(shared.clone());
                tokio::spawn(async move {
                    let stop = async move {
                        let _ = admin_stop_rx.changed().await;
                    };
                    let app = app.into_make_service_with_connect_info::<SocketAddr>();
                    if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                        tracing::error!(error = %e, "admin listener failed");
                    }
                });
                if shared.snapshot.load().validated.admin_tokens.is_empty() {
                    tracing::warn!(address = %local, "admin API has no token (admin.token): read-only endpoints are open, mutating endpoints are disabled");
                }
                tracing::info!(address = %local, "admin listening");
                Some(local)
            }
            None => None,
        };
        for p in shared.snapshot.load().pools.values() {
            health::spawn_checker(Arc::downgrade(&shared), p);
        }
        shared.ready.store(true, Ordering::SeqCst);
        Ok(Edge {
            shared,
            admin_addr,
            admin_stop,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn addrs(&self, kind: Kind) -> Vec<SocketAddr> {
        self.shared
            .listeners
            .lock()
            .map(|l| l.iter().filter(|h| h.kind == kind).map(|h| h.addr).collect())
            .unwrap_or_default()
    }

    /// Bound plain-HTTP listener addresses, in config order.
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Plain)
    }

    /// Bound TLS listener addresses, in config order.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Tls)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Reload from the config file (what SIGHUP does); audited as operator `signal`.
    pub async fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        let r = self.shared.reload().await;
        match &r {
            Ok(ok) => self.shared.control.record_audit(
                "signal",
                "config-reload",
                &format!("version {} hash {}", ok.version, ok.hash),
                None,
            ),
            Err(e) => self.shared.control.record_audit(
                "signal",
                "config-reload-refused",
                "config",
                Some(format!("{} error(s)", e.messages().len())),
            ),
        }
        r
    }

    /// The configured drain deadline (`server.shutdown_timeout`).
    pub fn shutdown_timeout(&self) -> Duration {
        self.shared
            .snapshot
            .load()
            .validated
            .config
            .server
            .shutdown_timeout
            .get()
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish (idle
    /// keep-alive connections are closed), and give up on what remains after `grace`.
    pub async fn shutdown(self, grace: Duration) -> ShutdownReport {
        self.shared.ready.store(false, Ordering::SeqCst);
        if let Ok(l) = self.shared.listeners.lock() {
            for h in l.iter() {
                h.stop();
            }
        }
        let _ = self.shared.shutdown.send(true);
        let drained = tokio::time::timeout(grace, self.shared.conns.drained()).await.is_ok();
        let abandoned = if drained { 0 } else { self.shared.conns.active() };
        if abandoned > 0 {
            tracing::warn!(abandoned, "shutdown deadline passed with connections still open");
        }
        let _ = self.admin_stop.send(true);
        ShutdownReport { abandoned }
    }
}
