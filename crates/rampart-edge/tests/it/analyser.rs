//! The analyser: trace reports, recommendations, approval that changes routing,
//! the audit log, and persistence across restarts.

use crate::common::*;
use rampart_testkit::Origin;
use std::path::Path;
use std::time::Duration;

fn config(a: &Origin, b: &Origin, data_dir: &Path, extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
data_dir = "{dir}"
[admin]
listen = "127.0.0.1:0"
token = "file:token"
[log]
access = "off"
[[chain]]
name = "live"
providers = [
  {{ name = "cdn-a", url = "{a}", timeout = "300ms" }},
  {{ name = "cdn-b", url = "{b}" }},
]
cooldown_after = 100
adaptive = false
recommend_after = 3
{extra}
[[site]]
default = true
explain = true
  [[site.route]]
  path = "/"
  chain = "live"
"#,
        dir = data_dir.display(),
        a = a.url(),
        b = b.url()
    )
}

async fn attempts(e: &TestEdge, path: &str) -> String {
    let r = client().get(e.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.headers()["x-rampart-attempts"].to_str().unwrap().to_string()
}

async fn decide(e: &TestEdge, id: &str, what: &str, body: &str) -> (u16, serde_json::Value) {
    e.admin_post(&format!("/admin/recommendations/{id}/{what}"), "tok", body)
        .await
}

#[tokio::test]
async fn analyze_explains_a_trace() {
    let a = Origin::start("cdn-a").await.unwrap();
    let b = Origin::start("cdn-b").await.unwrap();
    a.set_hang("/v/1.ts", true);
    let data = temp_dir();
    let e = TestEdge::start_with_token(&config(&a, &b, &data, ""), "tok").await;
    let r = client().get(e.url("/v/1.ts")).send().await.unwrap();
    let header = r.headers()["x-rampart-route-trace"].to_str().unwrap().to_string();
    let report: serde_json::Value = client()
        .post(e.admin("/admin/analyze"))
        .bearer_auth("tok")
        .body(serde_json::json!({ "trace": header }).to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["summary"]["attempts"], 2);
    assert_eq!(report["summary"]["failed_providers"]["timeout"][0], "cdn-a");
    assert_eq!(report["failure_points"]["by_kind"]["PROVIDER_TIMEOUT"], 1);
    assert_eq!(report["notices"][0]["severity"], "warning");
    assert!(
        report["notices"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("cdn-a timed out after")
    );
    assert_eq!(report["recommendation"], "cool down cdn-a on /v/ for 15 minutes");
    assert_eq!(report["proposed_change"]["action"], "cooldown");
    assert_eq!(report["proposed_change"]["provider"], "cdn-a");

    // The JSON from /admin/traces is accepted as is.
    let traces = e.admin_json("/admin/traces?limit=1", Some("tok")).await;
    let r2: serde_json::Value = client()
        .post(e.admin("/admin/analyze"))
        .bearer_auth("tok")
        .body(traces["traces"][0].to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r2["proposed_change"], report["proposed_change"]);
    let bad = client()
        .post(e.admin("/admin/analyze"))
        .bearer_auth("tok")
        .body("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn an_approved_recommendation_moves_traffic_and_survives_a_restart() {
    let a = Origin::start("cdn-a").await.unwrap();
    let b = Origin::start("cdn-b").await.unwrap();
    for i in 1..=3 {
        a.set_status(&format!("/live/x/{i}.ts"), Some(503));
    }
    let data = temp_dir();
    let cfg = config(&a, &b, &data, "");
    let e = TestEdge::start_with_token(&cfg, "tok").await;
    for i in 1..=3 {
        assert!(
            attempts(&e, &format!("/live/x/{i}.ts"))
                .await
                .starts_with("cdn-a:PROVIDER_BLOCKED_503")
        );
    }
    let recs = e.admin_json("/admin/recommendations", Some("tok")).await;
    let rec = &recs["recommendations"][0];
    assert_eq!(rec["status"], "pending");
    assert_eq!(rec["action"], "demote");
    assert_eq!(rec["provider"], "cdn-a");
    assert_eq!(rec["route_key"], "/live/x/");
    assert_eq!(
        recs["recommendations"].as_array().unwrap().len(),
        1,
        "no duplicates while pending"
    );
    let id = rec["id"].as_str().unwrap().to_string();

    // Until approved, nothing changes: cdn-a (now fine) is still tried first.
    assert_eq!(attempts(&e, "/live/x/4.ts").await, "cdn-a:PROVIDER_SUCCESS");

    assert_eq!(decide(&e, &id, "approve", "{}").await.0, 400, "an operator is required");
    assert_eq!(decide(&e, &id, "approve", r#"{"note":"x"}"#).await.0, 400);
    assert_eq!(decide(&e, "rec-999", "approve", r#"{"operator":"ana"}"#).await.0, 404);
    let (status, body) = decide(&e, &id, "approve", r#"{"operator":"ana","note":"cdn-a flaky on live"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "approved");
    assert_eq!(
        decide(&e, &id, "approve", r#"{"operator":"ana"}"#).await.0,
        409,
        "approving twice"
    );
    assert_eq!(decide(&e, &id, "reject", r#"{"operator":"bo"}"#).await.0, 409);

    // Approval changed routing on that route scope only.
    assert_eq!(attempts(&e, "/live/x/5.ts").await, "cdn-b:PROVIDER_SUCCESS");
    assert_eq!(attempts(&e, "/live/y/1.ts").await, "cdn-a:PROVIDER_SUCCESS");
    let t = e.admin_json("/admin/traces?route=/live/x/&limit=1", Some("tok")).await;
    assert_eq!(t["traces"][0]["rank"][1]["state"], "operator:demote:route:/live/x/");

    let audit = e.admin_json("/admin/audit", Some("tok")).await;
    assert_eq!(audit["audit"][0]["operator"], "ana");
    assert_eq!(audit["audit"][0]["action"], "approve");
    assert_eq!(audit["audit"][0]["note"], "cdn-a flaky on live");

    // Restart with the same data directory: decisions, audit and the change persist.
    let mut e = e;
    e.edge.take().unwrap().shutdown(Duration::from_secs(2)).await;
    let e2 = TestEdge::start_with_token(&cfg, "tok").await;
    let recs = e2.admin_json("/admin/recommendations", Some("tok")).await;
    assert_eq!(recs["recommendations"][0]["status"], "approved");
    assert_eq!(
        e2.admin_json("/admin/audit", Some("tok")).await["audit"][0]["operator"],
        "ana"
    );
    assert_eq!(attempts(&e2, "/live/x/6.ts").await, "cdn-b:PROVIDER_SUCCESS");
    let _ = std::fs::remove_dir_all(data);
}

#[tokio::test]
async fn a_timeout_that_fires_just_before_success_is_raised() {
    let a = Origin::start("cdn-a").await.unwrap();
    let b = Origin::start("cdn-b").await.unwrap();
    let data = temp_dir();
    let e = TestEdge::start_with_token(&config(&a, &b, &data, ""), "tok").await;
    // cdn-a succeeds slowly (250 ms of a 300 ms timeout), then times out three times.
    assert_eq!(attempts(&e, "/slow/ok?delay=250ms").await, "cdn-a:PROVIDER_SUCCESS");
    for i in 1..=3 {
        a.set_hang(&format!("/slow/{i}"), true);
        assert!(
            attempts(&e, &format!("/slow/{i}"))
                .await
                .starts_with("cdn-a:PROVIDER_TIMEOUT")
        );
    }
    let recs = e.admin_json("/admin/recommendations", Some("tok")).await;
    let rec = &recs["recommendations"][0];
    assert_eq!(rec["action"], "raise_timeout", "{recs}");
    assert_eq!(rec["timeout_ms"], 450);
    let id = rec["id"].as_str().unwrap().to_string();
    // Before approval a 400 ms answer times out; after, cdn-a serves it.
    assert!(
        attempts(&e, "/slow/x?delay=400ms")
            .await
            .starts_with("cdn-a:PROVIDER_TIMEOUT")
    );
    assert_eq!(decide(&e, &id, "approve", r#"{"operator":"ana"}"#).await.0, 200);
    assert_eq!(attempts(&e, "/slow/y?delay=400ms").await, "cdn-a:PROVIDER_SUCCESS");
    let _ = std::fs::remove_dir_all(data);
}
