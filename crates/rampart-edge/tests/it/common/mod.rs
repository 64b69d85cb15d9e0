//! Test harness: start a real edge from config text on ephemeral loopback ports.

use rampart_edge::Edge;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub struct TestEdge {
    pub edge: Option<Edge>,
    pub dir: PathBuf,
    pub http: SocketAddr,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

pub fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rampart-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl TestEdge {
    /// Start an edge from config text (written to a temp dir, so reload works).
    pub async fn start(config: &str) -> TestEdge {
        Self::start_in(temp_dir(), config).await
    }

    pub async fn start_in(dir: PathBuf, config: &str) -> TestEdge {
        Self::start_with_workers(dir, config, Vec::new()).await
    }

    /// Start an edge with the per-core runtime model on these worker runtimes.
    pub async fn start_on(config: &str, workers: Vec<tokio::runtime::Handle>) -> TestEdge {
        Self::start_with_workers(temp_dir(), config, workers).await
    }

    async fn start_with_workers(dir: PathBuf, config: &str, workers: Vec<tokio::runtime::Handle>) -> TestEdge {
        let path = dir.join("rampart.toml");
        std::fs::write(&path, config).unwrap();
        let v = rampart_config::load_file(&path).unwrap_or_else(|e| panic!("config: {e}"));
        let edge = Edge::start_on(v, Some(path), workers).await.unwrap();
        let http = edge
            .http_addrs()
            .first()
            .copied()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        TestEdge {
            edge: Some(edge),
            dir,
            http,
        }
    }

    /// Start an edge whose config reads its admin token from a file `token` beside it
    /// (`token = "file:token"`).
    pub async fn start_with_token(config: &str, token: &str) -> TestEdge {
        let dir = temp_dir();
        std::fs::write(dir.join("token"), token).unwrap();
        Self::start_in(dir, config).await
    }

    pub fn edge(&self) -> &Edge {
        self.edge.as_ref().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.edge().admin_addr().unwrap(), path)
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The `rampart_parked_connections` gauge.
    pub async fn parked(&self) -> u64 {
        let m = self.metrics().await;
        m.lines()
            .find_map(|l| l.strip_prefix("rampart_parked_connections "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the parked_connections gauge")
    }

    /// GET an admin path (with the bearer token, if given) and parse the JSON answer.
    pub async fn admin_json(&self, path: &str, token: Option<&str>) -> serde_json::Value {
        let mut r = client().get(self.admin(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.unwrap().json().await.unwrap()
    }

    /// POST `body` to an admin path with the bearer token: the status and the JSON
    /// answer (`Null` when the answer is not JSON).
    pub async fn admin_post(&self, path: &str, token: &str, body: &str) -> (u16, serde_json::Value) {
        let r = client()
            .post(self.admin(path))
            .bearer_auth(token)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(self.dir.join("rampart.toml"), config).unwrap();
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The TOML around a test config's pool `app` and default site: each field is put
/// in its place (empty: nothing).
#[derive(Default)]
pub struct Parts<'a> {
    /// More `[server]` fields.
    pub server: &'a str,
    /// An admin listener on `127.0.0.1:0`, with these extra `[admin]` fields.
    pub admin: Option<&'a str>,
    /// Top-level sections (`[cache]`, `[[rate_limit]]`, `[waf]`, ...).
    pub top: &'a str,
    /// More `[[pool]]` fields for `app` (and whatever follows it, such as more pools).
    pub pool: &'a str,
    /// More `[[site]]` fields.
    pub site: &'a str,
    /// More fields of the `/` route.
    pub route: &'a str,
    /// More routes.
    pub routes: &'a str,
}

/// A config with one plain listener, access logs off, one pool `app` of `backends`
/// and a default site whose `/` route goes to it.
pub fn one_pool(backends: &[&str], p: Parts<'_>) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let admin = p
        .admin
        .map(|extra| format!("[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n"))
        .unwrap_or_default();
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
{server}
{admin}[log]
access = "off"
{top}
[[pool]]
name = "app"
backends = [{list}]
{pool}
[[site]]
default = true
{site}
  [[site.route]]
  path = "/"
  pool = "app"
  {route}
{routes}
"#,
        server = p.server,
        top = p.top,
        pool = p.pool,
        site = p.site,
        route = p.route,
        routes = p.routes,
    )
}

/// A config with one plain listener, one pool and one default site routing `/` to it.
pub fn simple(backend: &str, extra_pool: &str) -> String {
    one_pool(
        &[backend],
        Parts {
            pool: extra_pool,
            site: "explain = true",
            ..Parts::default()
        },
    )
}

/// Poll `f` until it is true or the deadline passes.
pub async fn eventually<F: FnMut() -> bool>(mut f: F, within: Duration) -> bool {
    let end = tokio::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Send raw bytes and read the whole reply until the server closes or `within` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A response header as a string ("" when absent).
pub fn header_str(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Read one response with a Content-Length body: (head, body).
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let (head, mut body) = read_head(s).await;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    let mut chunk = [0u8; 4096];
    while body.len() < len {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed inside a body");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len, "nothing beyond the body");
    (head, body)
}

/// Read one response head: (head, the bytes read after it).
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(n > 0, "closed before a response: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    (head, buf[head_end..].to_vec())
}
