//! Custom WAF rules: `[[waf.rule]]` entries, each an expression ([`super::expr`])
//! and an action, compiled when the config loads and run in order on every request
//! after the access lists and before the rate limits.
//!
//! Actions: `block` (status and body configurable; default 403 with a JSON body
//! naming the rule and the request id), `log` (count and go on), `skip` (the
//! remaining rules and/or the rate limits), `allow` (stop here and skip the rate
//! limits). A rule in shadow mode, or every rule under `waf.shadow`, logs instead
//! of blocking.

use super::expr::{Expr, Request};
use bytes::Bytes;
use http::StatusCode;
use rampart_config::{WafAction, WafRule};
use std::sync::Arc;

enum Action {
    Block { status: StatusCode, body: Option<Bytes> },
    Log,
    Skip { rules: bool, rate_limit: bool },
    Allow,
}

struct Rule {
    id: Arc<str>,
    expr: Expr,
    action: Action,
    shadow: bool,
}

pub struct Waf {
    rules: Vec<Rule>,
    /// Whether any rule reads the body (then the body is read up to `body_limit`).
    pub reads_body: bool,
    pub body_limit: usize,
    /// Refuse bodies over the limit instead of inspecting their prefix.
    pub overflow_blocks: bool,
}

/// A blocking rule's answer.
pub struct Block {
    pub rule: Arc<str>,
    pub status: StatusCode,
    pub body: Option<Bytes>,
}

/// The outcome of the rules for one request.
#[derive(Default)]
pub struct Verdict {
    pub block: Option<Block>,
    pub skip_rate_limit: bool,
    /// Rules that matched without blocking: (rule, action) for metrics and the log.
    pub matched: Vec<(Arc<str>, &'static str)>,
}

impl Waf {
    /// Compile `[waf]`; errors name the rule (`waf.rule[3]`, with its id) and say
    /// where in the expression and what was expected.
    pub fn build(cfg: &rampart_config::Waf) -> Result<Waf, Vec<(String, String)>> {
        let mut errs = Vec::new();
        let mut rules = Vec::with_capacity(cfg.rule.len());
        let mut ids = std::collections::HashSet::new();
        for (i, r) in cfg.rule.iter().enumerate() {
            let at = format!("waf.rule[{i}]");
            if r.id.trim().is_empty() {
                errs.push((format!("{at}.id"), "must not be empty".into()));
            } else if !ids.insert(r.id.as_str()) {
                errs.push((format!("{at}.id"), format!("\"{}\" is used twice", r.id)));
            }
            match compile(r, &at) {
                Ok(rule) => rules.push(rule),
                Err(e) => errs.push(e),
            }
        }
        if cfg.body_limit.bytes() == 0 || cfg.body_limit.bytes() > 16 << 20 {
            errs.push(("waf.body_limit".into(), "must be between 1 byte and 16MiB".into()));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let shadow_all = cfg.shadow;
        for r in &mut rules {
            r.shadow |= shadow_all;
        }
        Ok(Waf {
            reads_body: rules.iter().any(|r| r.expr.reads_body),
            rules,
            body_limit: cfg.body_limit.as_usize(),
            overflow_blocks: cfg.body_overflow == rampart_config::BodyOverflow::Block,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Run the rules in order.
    pub fn evaluate(&self, req: &Request<'_>) -> Verdict {
        let mut v = Verdict::default();
        for r in &self.rules {
            if !r.expr.matches(req) {
                continue;
            }
            match &r.action {
                Action::Block { .. } if r.shadow => v.matched.push((r.id.clone(), "log")),
                Action::Block { status, body } => {
                    v.block = Some(Block {
                        rule: r.id.clone(),
                        status: *status,
                        body: body.clone(),
                    });
                    return v;
                }
                Action::Log => v.matched.push((r.id.clone(), "log")),
                Action::Skip { rules, rate_limit } => {
                    v.matched.push((r.id.clone(), "skip"));
                    v.skip_rate_limit |= *rate_limit;
                    if *rules {
                        return v;
                    }
                }
                Action::Allow => {
                    v.matched.push((r.id.clone(), "allow"));
                    v.skip_rate_limit = true;
                    return v;
                }
            }
        }
        v
    }
}

fn compile(r: &WafRule, at: &str) -> Result<Rule, (String, String)> {
    let expr =
        Expr::compile(&r.expression).map_err(|e| (format!("{at}.expression"), format!("rule \"{}\": {e}", r.id)))?;
    let action = match r.action {
        WafAction::Block => {
            let status = match r.status {
                None => StatusCode::FORBIDDEN,
                Some(s) => StatusCode::from_u16(s)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .ok_or_else(|| (format!("{at}.status"), "must be a 4xx or 5xx status".to_string()))?,
            };
            Action::Block {
                status,
                body: r.body.clone().map(Bytes::from),
            }
        }
        WafAction::Log => Action::Log,
        WafAction::Allow => Action::Allow,
        WafAction::Skip => {
            let mut rules = r.skip.is_empty();
            let mut rate_limit = false;
            for (j, s) in r.skip.iter().enumerate() {
                match s.as_str() {
                    "rules" => rules = true,
                    "rate_limit" => rate_limit = true,
                    other => {
                        return Err((
                            format!("{at}.skip[{j}]"),
                            format!("`{other}`: use \"rules\" or \"rate_limit\""),
                        ));
                    }
                }
            }
            Action::Skip { rules, rate_limit }
        }
    };
    if r.action != WafAction::Block && (r.status.is_some() || r.body.is_some()) {
        return Err((
            format!("{at}.status"),
            "status and body apply to `block` rules only".into(),
        ));
    }
    if r.action != WafAction::Skip && !r.skip.is_empty() {
        return Err((format!("{at}.skip"), "applies to `skip` rules only".into()));
    }
    Ok(Rule {
        id: Arc::from(r.id.as_str()),
        expr,
        action,
        shadow: r.shadow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn rule(id: &str, expression: &str, action: WafAction) -> WafRule {
        WafRule {
            id: id.into(),
            expression: expression.into(),
            action,
            status: None,
            body: None,
            shadow: false,
            skip: Vec::new(),
        }
    }

    fn req(h: &HeaderMap) -> Request<'_> {
        Request {
            method: "GET",
            uri: "/wp-login.php",
            path: "/wp-login.php",
            query: "",
            headers: h,
            host: "a.test",
            ip: "192.0.2.1".parse().unwrap(),
            tls: false,
            body: b"",
            body_size: 0,
            body_truncated: false,
        }
    }

    fn waf(rules: Vec<WafRule>) -> Waf {
        let cfg = rampart_config::Waf {
            rule: rules,
            ..rampart_config::Waf::default()
        };
        Waf::build(&cfg).unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn order_and_actions() {
        let h = HeaderMap::new();
        let w = waf(vec![
            rule("log-wp", r#"http.request.uri.path contains "wp-""#, WafAction::Log),
            rule(
                "block-wp",
                r#"http.request.uri.path eq "/wp-login.php""#,
                WafAction::Block,
            ),
        ]);
        let v = w.evaluate(&req(&h));
        assert_eq!(v.block.as_ref().map(|b| &*b.rule), Some("block-wp"));
        assert_eq!(v.matched.len(), 1);

        let mut allow = rule("office", r#"ip.src in {192.0.2.0/24}"#, WafAction::Allow);
        allow.shadow = false;
        let w = waf(vec![
            allow,
            rule("block-wp", "http.request.method eq \"GET\"", WafAction::Block),
        ]);
        let v = w.evaluate(&req(&h));
        assert!(
            v.block.is_none() && v.skip_rate_limit,
            "allow stops the rules and the rate limits"
        );

        let mut skip = rule("skip-rl", "ssl or not ssl", WafAction::Skip);
        skip.skip = vec!["rate_limit".into()];
        let w = waf(vec![
            skip,
            rule("b", "http.request.method eq \"GET\"", WafAction::Block),
        ]);
        let v = w.evaluate(&req(&h));
        assert!(
            v.skip_rate_limit && v.block.is_some(),
            "skipping rate limits only: rules go on"
        );
    }

    #[test]
    fn shadow_turns_blocks_into_logs() {
        let h = HeaderMap::new();
        let mut r = rule("b", "http.request.method eq \"GET\"", WafAction::Block);
        r.shadow = true;
        let v = waf(vec![r]).evaluate(&req(&h));
        assert!(v.block.is_none());
        assert_eq!(v.matched, vec![(Arc::from("b"), "log")]);
        let cfg = rampart_config::Waf {
            shadow: true,
            rule: vec![rule("b", "http.request.method eq \"GET\"", WafAction::Block)],
            ..rampart_config::Waf::default()
        };
        assert!(
            Waf::build(&cfg)
                .unwrap_or_else(|_| panic!())
                .evaluate(&req(&h))
                .block
                .is_none()
        );
    }

    #[test]
    fn config_errors_name_the_rule() {
        let mut bad_status = rule("s", "ssl", WafAction::Block);
        bad_status.status = Some(200);
        let cfg = rampart_config::Waf {
            rule: vec![
                rule("ok", "ssl", WafAction::Log),
                rule("typo", "http.request.method = \"GET\"", WafAction::Block),
                rule("ok", "ssl", WafAction::Log),
                bad_status,
            ],
            ..rampart_config::Waf::default()
        };
        let errs = Waf::build(&cfg).err().unwrap_or_default();
        let text: Vec<String> = errs.iter().map(|(p, m)| format!("{p}: {m}")).collect();
        assert_eq!(
            text[0],
            "waf.rule[1].expression: rule \"typo\": at column 21: expected an operator after http.request.method (a string), found `=`"
        );
        assert_eq!(text[1], "waf.rule[2].id: \"ok\" is used twice");
        assert_eq!(text[2], "waf.rule[3].status: must be a 4xx or 5xx status");
    }
}
