//! The `rampart` binary end to end: check, edge with SIGHUP/SIGTERM, demo, and the examples.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rampart-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_example_config_is_valid() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(BIN)
                .args(["check", "--config"])
                .arg(&path)
                .env("RAMPART_ADMIN_TOKEN", "example")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(stdout.lines().count(), 1, "one-line summary: {stdout}");
            assert!(stdout.contains("config ok"), "{stdout}");
            n += 1;
        }
    }
    assert!(n >= 2, "examples found: {n}");
}

#[test]
fn check_reports_every_error_with_its_path() {
    let dir = temp_dir("check");
    let cfg = r#"
[server]
listen = ["127.0.0.1:8080"]
[[pool]]
name = "app"
backends = ["http://127.0.0.1:9000"]
[[site]]
hosts = ["a.test"]
  [[site.route]]
  path = "/"
  pool = "app"
  [[site.route]]
  path = "/x"
  pool = "app"
  [[site.route]]
  path = "/y"
  pool = "ap"
  [[site.route]]
  path = "/z"
  pool = "nope"
"#;
    let path = dir.join("bad.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"site[0].route[2].pool: no pool named "ap" (did you mean "app"?)"#),
        "{err}"
    );
    assert!(err.contains(r#"site[0].route[3].pool: no pool named "nope""#), "{err}");
    assert!(err.contains("configuration rejected (2 error(s))"), "{err}");

    std::fs::write(&path, "[server]\nlisten = [\"127.0.0.1:1\"]\nworkrs = 2\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.workrs: unknown field (did you mean `workers`?)"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent.toml"));
    let _ = std::fs::remove_dir_all(dir);
}

/// A child process whose stderr and stdout lines arrive on channels.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(args: &[&str], cwd: &Path) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait for a line containing `needle`; return it.
    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no line with {needle:?}; saw:\n{}", self.seen.join("\n"));
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn after<'a>(line: &'a str, key: &str) -> &'a str {
    let i = line.find(key).unwrap_or_else(|| panic!("{key} not in {line}")) + key.len();
    line[i..].split_whitespace().next().unwrap().trim_matches('"')
}

async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap()
}

fn config(backend: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_timeout = \"5s\"\n[log]\naccess = \"off\"\n[[pool]]\nname = \"app\"\nbackends = [\"{backend}\"]\n[[site]]\ndefault = true\n  [[site.route]]\n  path = \"/\"\n  pool = \"app\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_reloads_on_sighup_and_drains_on_sigterm() {
    let a = rampart_testkit::Origin::start("a").await.unwrap();
    let b = rampart_testkit::Origin::start("b").await.unwrap();
    let dir = temp_dir("edge");
    let path = dir.join("rampart.toml");
    std::fs::write(&path, config(&a.url())).unwrap();
    let mut p = Proc::spawn(&["edge", "--config", "rampart.toml"], &dir);
    let line = p.wait_for("listening", Duration::from_secs(20));
    // A SIGHUP as soon as the edge says it listens reloads it (the handlers are
    // installed before the listeners bind; the default action would end it).
    p.signal("HUP");
    p.wait_for("configuration reloaded", Duration::from_secs(10));
    p.seen.clear();
    let addr = after(&line, "address=").to_string();
    let url = format!("http://{addr}/");
    assert_eq!(get(&url).await.headers()["x-origin-name"], "a");

    std::fs::write(&path, config(&b.url())).unwrap();
    p.signal("HUP");
    p.wait_for("configuration reloaded", Duration::from_secs(10));
    assert_eq!(get(&url).await.headers()["x-origin-name"], "b");

    std::fs::write(&path, config(&b.url()).replace("pool = \"app\"\n", "pool = \"ap\"\n")).unwrap();
    p.signal("HUP");
    let rejected = p.wait_for("reload rejected", Duration::from_secs(10));
    assert!(rejected.contains("no pool named"), "{rejected}");
    assert_eq!(
        get(&url).await.headers()["x-origin-name"],
        "b",
        "old config keeps serving"
    );

    // A slow response in flight when SIGTERM arrives still completes.
    let slow = tokio::spawn({
        let url = format!("http://{addr}/slow?chunks=4&interval=100ms");
        async move { get(&url).await.text().await.unwrap() }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.requests() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.signal("TERM");
    assert_eq!(slow.await.unwrap().lines().count(), 4);
    let status = p.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_shows_the_edge_working() {
    let dir = temp_dir("demo");
    let mut p = Proc::spawn(&["demo", "--port", "0", "--admin-port", "0"], &dir);
    let edge = after(&p.wait_for("  edge ", Duration::from_secs(20)), "edge").to_string();
    let admin = after(&p.wait_for("  admin ", Duration::from_secs(5)), "admin").to_string();
    let r = get(&format!("{edge}/")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-rampart-reason"], "PROXIED");
    assert_eq!(r.text().await.unwrap(), "hello from demo-origin\n");
    let r = get(&format!("{edge}/broken/")).await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-rampart-reason"], "UPSTREAM_CONNECT_REFUSED");
    let r = get(&format!("{edge}/video/intro.mp4")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-rampart-provider"], "cdn-ok");
    assert_eq!(
        r.headers()["x-rampart-attempts"],
        "cdn-slow:PROVIDER_TIMEOUT,cdn-block:PROVIDER_BLOCKED_429,cdn-ok:PROVIDER_SUCCESS"
    );
    let cached = format!("{edge}/cache/page?cc=max-age%3D30");
    assert_eq!(get(&cached).await.headers()["x-cache-status"], "MISS");
    assert_eq!(get(&cached).await.headers()["x-cache-status"], "HIT");
    // The WAF rule and the rate limit the demo prints commands for.
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = c
        .get(format!("{edge}/"))
        .header("user-agent", "sqlmap/1.7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-rampart-reason"], "WAF_BLOCKED");
    let r = get(&format!("{edge}/search?q=1%20UNION%20SELECT%20pw")).await;
    assert_eq!(r.status(), 403);
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(get(&format!("{edge}/api/items")).await.status().as_u16());
    }
    assert_eq!(codes, [200, 200, 200, 200, 200, 429]);
    let m = get(&format!("{admin}/metrics")).await.text().await.unwrap();
    assert!(
        m.contains(r#"rampart_requests_total{site="demo",route="/",class="2xx"} 1"#),
        "{m}"
    );
    // The access log goes to stdout as JSON lines.
    let logged = p.wait_for("\"path\":\"/broken/\"", Duration::from_secs(5));
    assert!(logged.contains("UPSTREAM_CONNECT_REFUSED"));
    p.signal("INT");
    assert!(p.wait_exit(Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(dir);
}
