//! Test origin with fault injection, used by Rampart's integration tests and
//! by `rampart demo` as its built-in origin.
//!
//! Per-request behaviour is chosen by path and query, so one origin serves every case:
//!
//! | request | behaviour |
//! | --- | --- |
//! | `/status/{code}` | respond with that status |
//! | `?delay=200ms` (any path) | wait before sending the response head |
//! | `/hang` | accept the request and never answer |
//! | `/drop` | read the request head, then close the connection without an answer (HTTP/1.1) |
//! | `/slow?chunks=5&interval=100ms` | a body sent in chunks with pauses between them |
//! | `/stall?after=N` | send N body bytes, then stop sending (connection kept open) |
//! | `/large?size=1048576` | a body of that many bytes, streamed |
//! | `/echo`, `…/echo` | JSON with method, path, query, headers, body length, (up to 64 KiB) the body received, and its trailers |
//! | `/ws` | WebSocket echo |
//! | `/cache/…?cc=max-age%3D60&etag=v1&vary=accept-encoding&cookie=1&lm=…&tag=t1&status=200&pad=N` | a cacheable response with those headers; body `n=<origin hit count> ae=<accept-encoding>` and N dots; `If-None-Match` matching `etag` gets 304; `Range: bytes=A-B` gets 206 |
//! | anything else | `200`, body `hello from {name}` |
//!
//! Connection-level faults use their own origin: [`Origin::resetting`] resets every
//! connection after reading the request head; [`Origin::raw`] answers every request
//! with fixed bytes (for invalid responses); [`closed_port`] has nothing listening.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

type Body = BoxBody<Bytes, std::io::Error>;

/// A running test origin. Dropping it stops the accept loop.
pub struct Origin {
    addr: SocketAddr,
    name: Arc<str>,
    requests: Arc<AtomicU64>,
    overrides: Overrides,
    paths: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
    connections: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

impl Origin {
    /// Start an HTTP/1.1 origin on an ephemeral loopback port.
    pub async fn start(name: &str) -> std::io::Result<Origin> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            name,
            Mode::Http { h2: false },
        )
        .await
    }

    /// Start an origin that speaks HTTP/2 with prior knowledge (h2c).
    pub async fn start_h2(name: &str) -> std::io::Result<Origin> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            name,
            Mode::Http { h2: true },
        )
        .await
    }

    /// Start an origin on a given address (the demo uses this).
    /// An origin on a given address; one from [`closed_port`] is given up to it.
    pub async fn start_at(addr: SocketAddr, name: &str) -> std::io::Result<Origin> {
        held_ports().retain(|s| s.local_addr().ok().and_then(|a| a.as_socket()) != Some(addr));
        Self::start_on(addr, name, Mode::Http { h2: false }).await
    }

    /// An origin that reads the request head, then resets the connection (TCP RST).
    pub async fn resetting() -> std::io::Result<Origin> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            "reset",
            Mode::Reset,
        )
        .await
    }

    /// An origin that answers every request head with exactly these bytes, then closes.
    pub async fn raw(bytes: &'static [u8]) -> std::io::Result<Origin> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            "raw",
            Mode::Raw(bytes),
        )
        .await
    }

    async fn start_on(addr: SocketAddr, name: &str, mode: Mode) -> std::io::Result<Origin> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let origin = Origin {
            addr,
            name: Arc::from(name),
            requests: Arc::new(AtomicU64::new(0)),
            overrides: Overrides::default(),
            paths: Arc::default(),
            connections: Arc::new(AtomicU64::new(0)),
            stop,
        };
        let state = State {
            name: origin.name.clone(),
            requests: origin.requests.clone(),
            overrides: origin.overrides.clone(),
            paths: origin.paths.clone(),
        };
        let conns = origin.connections.clone();
        tokio::spawn(accept_loop(listener, state, conns, mode, stop_rx));
        Ok(origin)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// From now on answer `path` with `status` (`None` removes the override). Lets one
    /// backend of a pool fail while another with the same paths succeeds.
    pub fn set_status(&self, path: &str, status: Option<u16>) {
        if let Ok(mut m) = self.overrides.lock() {
            match status {
                Some(s) => m.insert(path.to_string(), s),
                None => m.remove(path),
            };
        }
    }

    /// From now on never answer requests for `path` (or answer them again, with `false`).
    pub fn set_hang(&self, path: &str, hang: bool) {
        self.set_status(path, hang.then_some(HANG));
    }

    /// The paths of the most recent requests (up to 1000), oldest first.
    pub fn paths(&self) -> Vec<String> {
        self.paths
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// An address on loopback with nothing listening (connections are refused).
///
/// The port stays bound (a socket that never listens) for the rest of the test
/// process: a port merely closed could be handed out again to the next listener a
/// test binds, such as its origin, and then it would not be closed at all.
pub async fn closed_port() -> std::io::Result<SocketAddr> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let a = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    held_ports().push(s);
    Ok(a)
}

/// The sockets holding [`closed_port`]'s ports (until [`Origin::start_at`] takes one).
fn held_ports() -> std::sync::MutexGuard<'static, Vec<socket2::Socket>> {
    static HELD: std::sync::Mutex<Vec<socket2::Socket>> = std::sync::Mutex::new(Vec::new());
    HELD.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An address where TCP connects hang: a listener whose accept queue is full and
/// which never accepts, so further SYNs are dropped. Keep it alive while in use.
pub struct Blackhole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
}

impl Blackhole {
    pub async fn start() -> std::io::Result<Blackhole> {
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        sock.listen(0)?;
        let addr = sock
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut fillers = Vec::new();
        // Fill the queue until a connect no longer completes.
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Ok(Blackhole {
                        addr,
                        _listener: sock,
                        _fillers: fillers,
                    });
                }
            }
        }
        Err(std::io::Error::other("could not fill the accept queue"))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Http { h2: bool },
    Reset,
    Raw(&'static [u8]),
}

type Overrides = Arc<std::sync::Mutex<std::collections::HashMap<String, u16>>>;
/// An override meaning "never answer".
const HANG: u16 = 0;

#[derive(Clone)]
struct State {
    name: Arc<str>,
    requests: Arc<AtomicU64>,
    overrides: Overrides,
    paths: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

async fn accept_loop(
    listener: TcpListener,
    state: State,
    conns: Arc<AtomicU64>,
    mode: Mode,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            _ = stop.changed() => return,
        };
        conns.fetch_add(1, Ordering::SeqCst);
        let state = state.clone();
        tokio::spawn(async move {
            match mode {
                Mode::Http { h2 } => serve_http(stream, state, h2).await,
                Mode::Reset => reset_after_head(stream, state).await,
                Mode::Raw(bytes) => raw_reply(stream, state, bytes).await,
            }
        });
    }
}

async fn read_head(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return false;
        }
    }
    true
}

async fn reset_after_head(mut stream: TcpStream, state: State) {
    if read_head(&mut stream).await {
        state.requests.fetch_add(1, Ordering::SeqCst);
    }
    // SO_LINGER 0 turns the close into a RST.
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn raw_reply(mut stream: TcpStream, state: State, bytes: &[u8]) {
    if read_head(&mut stream).await {
        state.requests.fetch_add(1, Ordering::SeqCst);
        let _ = stream.write_all(bytes).await;
        let _ = stream.shutdown().await;
    }
}

async fn serve_http(stream: TcpStream, state: State, h2: bool) {
    let io = TokioIo::new(stream);
    let svc = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move {
            // `/drop`: read the head, then close the connection without an answer
            // (hyper closes a connection whose service fails).
            if req.uri().path() == "/drop" {
                note_request(&state, "/drop");
                return Err(std::io::Error::other("dropped without an answer"));
            }
            handle(req, state).await.map_err(|e| match e {})
        }
    });
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades()
            .await;
    }
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn parse_ms(v: &str) -> Option<Duration> {
    if let Some(ms) = v.strip_suffix("ms") {
        ms.parse().ok().map(Duration::from_millis)
    } else if let Some(s) = v.strip_suffix('s') {
        s.parse().ok().map(Duration::from_secs)
    } else {
        v.parse().ok().map(Duration::from_millis)
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn text(status: StatusCode, name: &str, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(name) {
        r.headers_mut().insert("x-origin-name", v);
    }
    r
}

/// Count a request and remember its path (the last 1,000).
fn note_request(state: &State, path: &str) {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut p) = state.paths.lock() {
        if p.len() >= 1000 {
            p.pop_front();
        }
        p.push_back(path.to_string());
    }
}

async fn handle(req: Request<Incoming>, state: State) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    note_request(&state, &path);
    let overridden = state.overrides.lock().ok().and_then(|m| m.get(&path).copied());
    if overridden == Some(HANG) {
        std::future::pending::<()>().await;
    }
    if let Some(code) = overridden {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(text(
            status,
            &state.name,
            format!("status {code} from {} (override)\n", state.name),
        ));
    }
    if let Some(d) = query_param(&query, "delay").and_then(parse_ms) {
        tokio::time::sleep(d).await;
    }
    let name = state.name.clone();
    if path == "/hang" {
        std::future::pending::<()>().await;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        return Ok(text(status, &name, format!("status {} from {name}\n", status.as_u16())));
    }
    if path.starts_with("/cache/") {
        return Ok(cacheable(&req, &query, &state));
    }
    if path.ends_with("/echo") {
        return Ok(echo(req, &name).await);
    }
    match path.as_str() {
        "/slow" => {
            let chunks: usize = query_param(&query, "chunks").and_then(|v| v.parse().ok()).unwrap_or(5);
            let interval = query_param(&query, "interval")
                .and_then(parse_ms)
                .unwrap_or(Duration::from_millis(100));
            let stream = futures_util::stream::unfold(0usize, move |i| async move {
                if i >= chunks {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(format!("chunk {i}\n")))),
                    i + 1,
                ))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert("x-origin-name", header(&name));
            Ok(r)
        }
        "/stall" => {
            let after: usize = query_param(&query, "after").and_then(|v| v.parse().ok()).unwrap_or(10);
            let stream = futures_util::stream::unfold(false, move |sent| async move {
                if sent {
                    std::future::pending::<()>().await;
                }
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; after]))),
                    true,
                ))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert("x-origin-name", header(&name));
            Ok(r)
        }
        "/large" => {
            let size: usize = query_param(&query, "size")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1 << 20);
            const CHUNK: usize = 64 * 1024;
            let stream = futures_util::stream::unfold(0usize, move |sent| async move {
                if sent >= size {
                    return None;
                }
                let n = CHUNK.min(size - sent);
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'a'; n]))),
                    sent + n,
                ))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert("content-length", HeaderValue::from(size));
            r.headers_mut().insert("x-origin-name", header(&name));
            Ok(r)
        }
        "/ws" => Ok(websocket(req, &name)),
        _ => Ok(text(StatusCode::OK, &name, format!("hello from {name}\n"))),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cacheable(req: &Request<Incoming>, query: &str, state: &State) -> Response<Body> {
    let param = |k: &str| query_param(query, k).map(percent_decode);
    let etag = param("etag").map(|e| format!("\"{e}\""));
    let n = state.requests.load(Ordering::SeqCst);
    let matches = etag.as_ref().is_some_and(|e| {
        req.headers()
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().trim_start_matches("W/") == e))
    });
    let status = if matches {
        StatusCode::NOT_MODIFIED
    } else {
        param("status")
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK)
    };
    let ae = req
        .headers()
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let body = if matches {
        String::new()
    } else {
        // `pad=N` appends N dots (at most 16 MiB), for size-dependent tests.
        let pad = param("pad")
            .and_then(|p| p.parse::<usize>().ok())
            .unwrap_or(0)
            .min(16 << 20);
        format!("n={n} ae={ae}{}", ".".repeat(pad))
    };
    // A single `Range: bytes=A-B` within the body is honoured with a 206.
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .filter(|(a, b)| status == StatusCode::OK && a <= b && *b < body.len());
    let total = body.len();
    let body = match range {
        Some((a, b)) => body[a..=b].to_string(),
        None => body,
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        status
    };
    let h = r.headers_mut();
    if let Some((a, b)) = range {
        h.insert("content-range", header(&format!("bytes {a}-{b}/{total}")));
    }
    h.insert("x-origin-name", header(&state.name));
    h.insert(
        "date",
        HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
            .unwrap_or(HeaderValue::from_static("")),
    );
    for (k, name) in [
        ("cc", "cache-control"),
        ("vary", "vary"),
        ("lm", "last-modified"),
        ("expires", "expires"),
        ("tag", "cache-tag"),
    ] {
        if let Some(v) = param(k).and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(name, v);
        }
    }
    if let Some(v) = etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        h.insert("etag", v);
    }
    if param("cookie").is_some() {
        h.insert("set-cookie", HeaderValue::from_static("session=secret-for-one-client"));
    }
    r
}

fn header(v: &str) -> HeaderValue {
    HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("origin"))
}

async fn echo(req: Request<Incoming>, name: &str) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let mut headers = serde_json::Map::new();
    for (k, v) in &parts.headers {
        let v = serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned());
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::Array(a)) => a.push(v),
            _ => {
                headers.insert(k.as_str().to_string(), serde_json::Value::Array(vec![v]));
            }
        }
    }
    let mut trailers = serde_json::Map::new();
    let (body_len, body_text, body_error) = match body.collect().await {
        Ok(b) => {
            for (k, v) in b.trailers().into_iter().flatten() {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                trailers.insert(k.as_str().to_string(), serde_json::Value::String(v));
            }
            let b = b.to_bytes();
            // The body itself when it is short enough to compare.
            let text = (b.len() <= 64 * 1024).then(|| String::from_utf8_lossy(&b).into_owned());
            (b.len(), text, None)
        }
        Err(e) => (0, None, Some(e.to_string())),
    };
    let j = serde_json::json!({
        "origin": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_length": body_len,
        "body": body_text,
        "body_error": body_error,
        "trailers": trailers,
    });
    let mut r = text(StatusCode::OK, name, j.to_string());
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn websocket(mut req: Request<Incoming>, name: &str) -> Response<Body> {
    let key = req.headers().get("sec-websocket-key").cloned();
    let is_upgrade = req
        .headers()
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = key.filter(|_| is_upgrade) else {
        return text(StatusCode::BAD_REQUEST, name, "expected a WebSocket upgrade\n".into());
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (mut tx, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert("connection", HeaderValue::from_static("upgrade"));
    h.insert("x-origin-name", header(name));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}
