//! The analyser: turns route traces into reports and recommendations, and applies
//! the recommendations an operator approves.
//!
//! - `analyze` explains one trace: what failed and how, notices with severities,
//!   and the change it would propose.
//! - Every chain trace is also aggregated per (chain, route scope, provider) over the
//!   last five minutes. When one provider fails `recommend_after` times on one route
//!   scope, a recommendation is raised: **raise_timeout** when it keeps timing out
//!   while its own successes come close to its timeout; **cooldown** for timeouts and
//!   fetch errors; **demote** for blocked statuses.
//! - An operator approves or rejects (`{operator, note}`; a missing operator is 400,
//!   deciding twice is 409). Approval changes routing at once, for the chain's
//!   `recommend_ttl`: the provider is tried after the others on that route scope, or
//!   gets the raised timeout. Every decision is in the audit log.
//! - Recommendations, decisions and the audit log are written to `server.data_dir`
//!   (`decisions.json`, replaced atomically) and restored at start, with approved
//!   changes re-applied for the time they have left.

use crate::chain::{Chain, HealthStore, Trace};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(300);
const MAX_EVENTS: usize = 256;
const MAX_RECOMMENDATIONS: usize = 500;
const MAX_AUDIT: usize = 1000;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Recommendation {
    pub id: String,
    pub created_unix: u64,
    /// `cooldown`, `demote` or `raise_timeout`.
    pub action: String,
    pub chain: String,
    pub provider: String,
    pub route_key: String,
    pub evidence: String,
    pub summary: String,
    pub ttl_seconds: u64,
    pub timeout_ms: Option<u64>,
    /// `pending`, `approved` or `rejected`.
    pub status: String,
    pub operator: Option<String>,
    pub note: Option<String>,
    pub decided_unix: Option<u64>,
    pub expires_unix: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub time: String,
    pub unix: u64,
    pub operator: String,
    pub action: String,
    pub target: String,
    pub note: Option<String>,
}

#[derive(Default, Serialize, Deserialize)]
struct Stored {
    next_id: u64,
    recommendations: Vec<Recommendation>,
    audit: VecDeque<AuditEntry>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Success,
    Timeout,
    Blocked,
    FetchError,
}

struct Event {
    at: Instant,
    kind: Kind,
    duration_ms: f64,
}

pub struct Control {
    stored: Mutex<Stored>,
    file: Option<PathBuf>,
    events: Mutex<HashMap<(String, String, String), VecDeque<Event>>>,
}

fn now_unix() -> u64 {
    crate::affinity::now_unix()
}

/// Why a decision could not be taken: an HTTP status and a message.
pub type Refusal = (u16, String);

impl Control {
    /// Open the store in `dir` (created if missing); `None` keeps everything in memory.
    pub fn open(dir: Option<PathBuf>) -> std::io::Result<Control> {
        let file = match dir {
            Some(d) => {
                std::fs::create_dir_all(&d)?;
                Some(d.join("decisions.json"))
            }
            None => None,
        };
        let stored = match &file {
            Some(f) if f.exists() => {
                let text = std::fs::read_to_string(f)?;
                serde_json::from_str(&text).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", f.display()))
                })?
            }
            _ => Stored::default(),
        };
        Ok(Control {
            stored: Mutex::new(stored),
            file,
            events: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stored> {
        crate::lock(&self.stored)
    }

    fn persist(&self, s: &Stored) {
        let Some(file) = &self.file else { return };
        let tmp = file.with_extension("json.tmp");
        let write = serde_json::to_vec_pretty(s)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = write {
            tracing::error!(file = %file.display(), error = %e, "cannot persist decisions");
        }
    }

    /// Re-apply approved changes that have not expired (at start).
    pub fn restore(&self, health: &HealthStore) {
        let now = now_unix();
        for r in self.lock().recommendations.iter().filter(|r| r.status == "approved") {
            if let Some(left) = r.expires_unix.filter(|e| *e > now).map(|e| e - now) {
                apply(health, r, Duration::from_secs(left));
            }
        }
    }

    pub fn recommendations(&self) -> Vec<Recommendation> {
        self.lock().recommendations.iter().rev().cloned().collect()
    }

    pub fn audit(&self) -> Vec<AuditEntry> {
        self.lock().audit.iter().rev().cloned().collect()
    }

    /// Record an operator action in the audit log.
    pub fn record_audit(&self, operator: &str, action: &str, target: &str, note: Option<String>) {
        let mut s = self.lock();
        push_audit(&mut s, operator, action, target, note);
        self.persist(&s);
    }

    /// Feed one chain decision to the aggregation; may raise recommendations.
    pub fn observe(&self, chain: &Chain, trace: &Trace) {
        let now = Instant::now();
        let mut raised = Vec::new();
        {
            let mut events = crate::lock(&self.events);
            if events.len() > 10_000 {
                events.retain(|_, q| q.back().is_some_and(|e| now.saturating_duration_since(e.at) < WINDOW));
            }
            for a in &trace.attempts {
                let Some(provider) = chain.providers.iter().find(|p| *p.name == *a.provider) else {
                    continue; // the origin fallback is not ranked
                };
                let kind = match a.result.as_str() {
                    "PROVIDER_SUCCESS" => Kind::Success,
                    "PROVIDER_TIMEOUT" => Kind::Timeout,
                    r if r.starts_with("PROVIDER_BLOCKED_") => Kind::Blocked,
                    _ => Kind::FetchError,
                };
                let key = (chain.name.to_string(), trace.route_key.clone(), a.provider.clone());
                let q = events.entry(key.clone()).or_default();
                q.push_back(Event {
                    at: now,
                    kind,
                    duration_ms: a.duration_ms,
                });
                while q.len() > MAX_EVENTS || q.front().is_some_and(|e| now.saturating_duration_since(e.at) > WINDOW) {
                    q.pop_front();
                }
                if kind == Kind::Success {
                    continue;
                }
                let count = |k: Kind| q.iter().filter(|e| e.kind == k).count() as u32;
                let (timeouts, blocked, fetch) = (count(Kind::Timeout), count(Kind::Blocked), count(Kind::FetchError));
                let limit_ms = provider.timeout.as_secs_f64() * 1000.0;
                let near_timeout = q
                    .iter()
                    .any(|e| e.kind == Kind::Success && e.duration_ms >= 0.7 * limit_ms);
                let n = chain.recommend_after;
                let (action, evidence, timeout_ms) = if timeouts >= n && near_timeout {
                    let raised_ms = (limit_ms * 1.5).round() as u64;
                    (
                        "raise_timeout",
                        format!(
                            "{timeouts} timeouts in 5 minutes while its successes took up to its {limit_ms:.0} ms timeout"
                        ),
                        Some(raised_ms),
                    )
                } else if timeouts + fetch >= n {
                    (
                        "cooldown",
                        format!("{timeouts} timeouts and {fetch} fetch errors in 5 minutes"),
                        None,
                    )
                } else if blocked >= n {
                    ("demote", format!("{blocked} blocked answers in 5 minutes"), None)
                } else {
                    continue;
                };
                raised.push((action, key, evidence, timeout_ms));
            }
        }
        if raised.is_empty() {
            return;
        }
        let mut s = self.lock();
        let now_u = now_unix();
        let mut changed = false;
        for (action, (chain_name, route, provider), evidence, timeout_ms) in raised {
            let open = s.recommendations.iter().any(|r| {
                r.action == action
                    && r.chain == chain_name
                    && r.provider == provider
                    && r.route_key == route
                    && (r.status == "pending" || (r.status == "approved" && r.expires_unix.is_some_and(|e| e > now_u)))
            });
            if open {
                continue;
            }
            s.next_id += 1;
            let ttl = chain.recommend_ttl.as_secs();
            let summary = match (action, timeout_ms) {
                ("raise_timeout", Some(ms)) => {
                    format!("raise {provider}'s timeout to {ms} ms for {} minutes", ttl / 60)
                }
                ("demote", _) => format!("move {provider} down the rank on {route} for {} minutes", ttl / 60),
                _ => format!("cool down {provider} on {route} for {} minutes", ttl / 60),
            };
            tracing::info!(chain = %chain_name, provider = %provider, route = %route, %summary, "recommendation raised");
            let id = format!("rec-{}", s.next_id);
            s.recommendations.push(Recommendation {
                id,
                created_unix: now_u,
                action: action.to_string(),
                chain: chain_name,
                provider,
                route_key: route,
                evidence,
                summary,
                ttl_seconds: ttl,
                timeout_ms,
                status: "pending".into(),
                operator: None,
                note: None,
                decided_unix: None,
                expires_unix: None,
            });
            changed = true;
        }
        if s.recommendations.len() > MAX_RECOMMENDATIONS {
            let excess = s.recommendations.len() - MAX_RECOMMENDATIONS;
            s.recommendations.drain(..excess);
        }
        if changed {
            self.persist(&s);
        }
    }

    /// Approve or reject a pending recommendation.
    pub fn decide(
        &self,
        id: &str,
        approve: bool,
        operator: Option<&str>,
        note: Option<String>,
        health: &HealthStore,
    ) -> Result<Recommendation, Refusal> {
        let operator = operator
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .ok_or((400, "an operator is required".to_string()))?;
        let mut s = self.lock();
        let Some(r) = s.recommendations.iter_mut().find(|r| r.id == id) else {
            return Err((404, format!("no recommendation {id}")));
        };
        if r.status != "pending" {
            return Err((409, format!("{id} was already {}", r.status)));
        }
        let now = now_unix();
        r.status = if approve { "approved" } else { "rejected" }.into();
        r.operator = Some(operator.to_string());
        r.note = note.clone();
        r.decided_unix = Some(now);
        if approve {
            r.expires_unix = Some(now + r.ttl_seconds);
            apply(health, r, Duration::from_secs(r.ttl_seconds));
        }
        let out = r.clone();
        let action = if approve { "approve" } else { "reject" };
        push_audit(
            &mut s,
            operator,
            action,
            &format!("{} ({}: {})", out.id, out.action, out.summary),
            note,
        );
        self.persist(&s);
        Ok(out)
    }
}

fn push_audit(s: &mut Stored, operator: &str, action: &str, target: &str, note: Option<String>) {
    s.audit.push_back(AuditEntry {
        time: crate::access_log::now_rfc3339(),
        unix: now_unix(),
        operator: operator.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        note,
    });
    while s.audit.len() > MAX_AUDIT {
        s.audit.pop_front();
    }
}

fn apply(health: &HealthStore, r: &Recommendation, ttl: Duration) {
    let action: &'static str = match r.action.as_str() {
        "raise_timeout" => "raise_timeout",
        "demote" => "demote",
        _ => "cooldown",
    };
    health.apply(
        action,
        &r.chain,
        &r.provider,
        &r.route_key,
        Instant::now() + ttl,
        r.timeout_ms.map(Duration::from_millis),
    );
}

/// Explain one route trace (as `/admin/traces` returns it).
pub fn analyze(trace: &Value) -> Result<Value, String> {
    let attempts = trace["attempts"].as_array().ok_or("the trace has no `attempts`")?;
    let points = trace["failure_points"].as_array().cloned().unwrap_or_default();
    let route = trace["route_key"].as_str().unwrap_or("/");
    let chain = trace["policy_id"].as_str().unwrap_or("");
    let mut failed: HashMap<&str, Vec<String>> = HashMap::new();
    let mut notices = Vec::new();
    for a in attempts {
        let provider = a["provider"].as_str().unwrap_or("?");
        let result = a["result"].as_str().unwrap_or("");
        let ms = a["duration_ms"].as_f64().unwrap_or(0.0);
        let kind = match result {
            "PROVIDER_SUCCESS" => continue,
            "PROVIDER_TIMEOUT" => "timeout",
            r if r.starts_with("PROVIDER_BLOCKED_") => "blocked",
            _ => "fetch_error",
        };
        failed.entry(kind).or_default().push(provider.to_string());
        let (severity, message) = match kind {
            "timeout" => ("warning", format!("{provider} timed out after {ms:.0} ms")),
            "blocked" => {
                let status = result.trim_start_matches("PROVIDER_BLOCKED_");
                let sev = if matches!(status, "403" | "451") {
                    "critical"
                } else {
                    "warning"
                };
                (sev, format!("{provider} blocked the request with {status}"))
            }
            _ => ("warning", format!("{provider} could not be fetched ({result})")),
        };
        notices.push(json!({"severity": severity, "message": message}));
    }
    let mut by_kind: HashMap<String, u64> = HashMap::new();
    for p in &points {
        *by_kind
            .entry(p["kind"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let fallback = trace["selected_fallback"].as_str().unwrap_or("none");
    if fallback == "blocked_by_policy" {
        notices.push(json!({"severity": "critical", "message": "every provider failed and the policy does not allow the origin fallback: the client got 503"}));
    } else if fallback == "origin" {
        notices.push(json!({"severity": "warning", "message": "every provider failed; the origin served the request"}));
    }
    // The first failure decides the proposal: it cost the client the most time.
    let first = points.first();
    let (recommendation, change) = match first {
        None => (
            "no change: the primary provider served the request".to_string(),
            Value::Null,
        ),
        Some(p) => {
            let provider = p["provider"].as_str().unwrap_or("?");
            let result = p["result"].as_str().unwrap_or("");
            let status = result.trim_start_matches("PROVIDER_BLOCKED_");
            let action = if result.starts_with("PROVIDER_BLOCKED_") && matches!(status, "403" | "404" | "451") {
                "demote"
            } else {
                "cooldown"
            };
            let text = if action == "demote" {
                format!("move {provider} down the rank on {route} for 15 minutes")
            } else {
                format!("cool down {provider} on {route} for 15 minutes")
            };
            (
                text,
                json!({"action": action, "chain": chain, "provider": provider, "route_key": route, "ttl_seconds": 900}),
            )
        }
    };
    Ok(json!({
        "summary": {
            "request_id": trace["request_id"],
            "route_key": route,
            "policy_id": chain,
            "attempts": attempts.len(),
            "final_status": trace["final_status"],
            "reason": trace["reason"],
            "failed_providers": {
                "timeout": failed.get("timeout").cloned().unwrap_or_default(),
                "blocked": failed.get("blocked").cloned().unwrap_or_default(),
                "fetch_error": failed.get("fetch_error").cloned().unwrap_or_default(),
            },
        },
        "failure_points": { "total": points.len(), "by_kind": by_kind },
        "notices": notices,
        "recommendation": recommendation,
        "proposed_change": change,
    }))
}
