//! Graceful shutdown: stop accepting, finish in-flight requests, give up at the deadline.

use crate::common::*;
use rampart_testkit::Origin;
use std::time::{Duration, Instant};

#[tokio::test]
async fn in_flight_requests_drain_and_new_connections_are_refused() {
    let origin = Origin::start("o").await.unwrap();
    let mut e = TestEdge::start(&simple(&origin.url(), "")).await;
    let slow = tokio::spawn({
        let url = e.url("/slow?chunks=5&interval=100ms");
        async move { client().get(url).send().await.unwrap().text().await.unwrap() }
    });
    assert!(eventually(|| origin.requests() == 1, Duration::from_secs(5)).await);
    let edge = e.edge.take().unwrap();
    let addr = e.http;
    let stop = tokio::spawn(async move { edge.shutdown(Duration::from_secs(10)).await });
    let refused = eventually(
        || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err(),
        Duration::from_secs(5),
    )
    .await;
    assert!(refused, "listener still accepting during shutdown");
    assert_eq!(
        slow.await.unwrap().lines().count(),
        5,
        "the in-flight response completed"
    );
    let report = stop.await.unwrap();
    assert_eq!(report.abandoned, 0);
}

#[tokio::test]
async fn shutdown_gives_up_at_the_deadline() {
    let origin = Origin::start("o").await.unwrap();
    let mut e = TestEdge::start(&simple(&origin.url(), "timeouts = { response_header = \"60s\" }")).await;
    let hung = tokio::spawn({
        let url = e.url("/hang");
        async move { client().get(url).send().await }
    });
    assert!(eventually(|| origin.requests() == 1, Duration::from_secs(5)).await);
    let t = Instant::now();
    let report = e.edge.take().unwrap().shutdown(Duration::from_millis(300)).await;
    assert_eq!(report.abandoned, 1);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    hung.abort();
}
