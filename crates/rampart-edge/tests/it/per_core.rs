//! The per-core runtime model (`runtime = "per_core"`, which `rampart edge` sets up):
//! every listener bound once per worker runtime with `SO_REUSEPORT`, connections
//! served by the runtime that accepted them, parked ones resumed on a worker.

use crate::common::*;
use rampart_testkit::Origin;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_listen_on_one_port_serve_resume_parked_connections_and_reload() {
    let workers = rampart_edge::workers::Workers::start(2).unwrap();
    let origin = Origin::start("o").await.unwrap();
    let config = |listen: &str| {
        one_pool(
            &[&origin.url()],
            Parts {
                admin: Some(""),
                ..Parts::default()
            },
        )
        .replace("listen = [\"127.0.0.1:0\"]", &format!("listen = [{listen}]"))
    };
    let e = TestEdge::start_on(&config("\"127.0.0.1:0\""), workers.handles()).await;

    // One socket per worker, all on one port.
    let addrs = e.edge().http_addrs();
    assert_eq!(addrs, vec![e.http, e.http], "one listening socket per worker");

    // New connections, wherever the kernel puts them, and keep-alive ones that reuse
    // their worker's upstream connections.
    for _ in 0..20 {
        let answer = raw(
            e.http,
            b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let mut s = TcpStream::connect(e.http).await.unwrap();
    for round in 0..3 {
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"hello from o\n");
        // Idle, it is parked by the control runtime's lot, and the next request
        // resumes it on a worker.
        let end = Instant::now() + Duration::from_secs(6);
        while e.parked().await < 1 {
            assert!(
                Instant::now() < end,
                "round {round}: the idle connection was not parked"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        origin.connections() < 23,
        "upstream connections were reused: {}",
        origin.connections()
    );

    // Requests with a body go through hyper's server and client on whichever worker
    // took the connection; hyper's pooled upstream connections are shared, their
    // tasks on the runtime that opened them.
    for i in 0..20 {
        let body = format!("body {i}");
        let request = format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = raw(e.http, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(&format!("\"body_length\":{}", body.len())), "{answer}");
    }

    // A reload binds a new address on every worker, and removing it stops them all.
    e.rewrite_config(&config("\"127.0.0.1:0\", \"127.0.0.2:0\""));
    e.edge().reload().await.unwrap();
    let addrs = e.edge().http_addrs();
    assert_eq!(addrs.len(), 4, "{addrs:?}");
    let added = addrs.iter().copied().find(|a| *a != e.http).unwrap();
    assert_eq!(addrs.iter().filter(|a| **a == added).count(), 2);
    let answer = raw(
        added,
        b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    e.rewrite_config(&config("\"127.0.0.1:0\""));
    e.edge().reload().await.unwrap();
    assert_eq!(e.edge().http_addrs().len(), 2);
    assert!(
        eventually(|| std::net::TcpStream::connect(added).is_err(), Duration::from_secs(5)).await,
        "the removed address stops accepting on every worker"
    );

    // Shutdown drains through the workers' tasks.
    drop(s);
    let mut e = e;
    let report = e.edge.take().unwrap().shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.abandoned, 0);
    drop(workers);
}

/// An HTTP/2 pool's connections are kept per worker: each worker runtime opens its
/// own connection to the backend and multiplexes its requests over it, rather
/// than sending them to a connection another runtime drives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_keeps_its_own_http2_upstream_connection() {
    let workers = rampart_edge::workers::Workers::start(2).unwrap();
    let origin = Origin::start_h2("h2o").await.unwrap();
    let e = TestEdge::start_on(&simple(&origin.url(), "protocol = \"http2\""), workers.handles()).await;
    // New client connections, one request each, in turn: the kernel spreads them
    // over both workers' sockets (all on one worker: 2 in 2^40).
    for _ in 0..40 {
        let answer = raw(
            e.http,
            b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("HTTP/2.0"), "{answer}");
    }
    assert_eq!(origin.requests(), 40);
    assert_eq!(origin.connections(), 2, "one upstream connection per worker");
}
