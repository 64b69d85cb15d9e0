use super::*;
use std::path::Path;

fn load(text: &str) -> Result<Validated, ConfigErrors> {
    load_str(text, Path::new("."))
}

fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.messages(),
    }
}

const BASE: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[[pool]]
name = "app"
backends = ["http://127.0.0.1:9000", { url = "http://127.0.0.1:9001", weight = 2 }]

[[site]]
hosts = ["example.test", "*.example.test"]
  [[site.route]]
  path = "/"
  pool = "app"
"#;

#[test]
fn contract_example_is_valid() {
    let v = load(BASE);
    assert!(v.is_ok(), "{v:?}");
    let Ok(v) = v else { return };
    assert_eq!(v.config.pool[0].backends[1].weight, 2);
    assert_eq!(v.config.pool[0].backends[0].weight, 1);
    assert!(v.summary().starts_with("config ok: 1 listener(s)"));
}

#[test]
fn missing_pool_names_the_route_and_suggests() {
    let text = BASE.replace("pool = \"app\"\n", "pool = \"ap\"\n");
    assert_eq!(
        errors(&text),
        vec![r#"site[0].route[0].pool: no pool named "ap" (did you mean "app"?)"#]
    );
}

#[test]
fn every_error_is_reported() {
    let text = r#"
[server]
listen = ["nope", "127.0.0.1:8080"]
trusted_proxies = ["10.0.0.0/99"]
[[pool]]
name = "app"
backends = ["ftp://x", { url = "http://h:1/path", weight = 0 }]
[[site]]
hosts = ["a.test"]
  [[site.route]]
  path = "/"
  pool = "app"
  [[site.route]]
  path = "/"
  pool = "web"
  [[site.route]]
  exact = "x"
  glob = "/y"
  pool = "app"
"#;
    let e = errors(text);
    let want = [
        "server.listen[0]: `nope` is not an address",
        "server.trusted_proxies[0]: `10.0.0.0/99` has an invalid prefix length",
        "pool[0].backends[0].url: scheme `ftp` is not supported",
        "pool[0].backends[1].url: `http://h:1/path` must not have a path",
        "pool[0].backends[1].weight: must be between 1 and 1000",
        "site[0].route[1].path: duplicate route for path \"/\"",
        "site[0].route[1].pool: no pool named \"web\"",
        "site[0].route[2]: set only one of `path`, `exact` and `glob`",
    ];
    for w in want {
        assert!(e.iter().any(|m| m.starts_with(w)), "missing {w:?} in {e:#?}");
    }
    assert_eq!(e.len(), want.len(), "{e:#?}");
}

#[test]
fn unknown_field_has_path_and_suggestion() {
    let text = BASE.replace("listen = [", "listn = [");
    assert_eq!(
        errors(&text),
        vec!["server.listn: unknown field (did you mean `listen`?)"]
    );
    let text = BASE.replace("pool = \"app\"\n", "pool = \"app\"\n  strip_prefx = true\n");
    assert_eq!(
        errors(&text),
        vec!["site[0].route[0].strip_prefx: unknown field (did you mean `strip_prefix`?)"]
    );
}

#[test]
fn bad_duration_and_size_name_the_field() {
    let text = format!(
        "{BASE}\n[[pool]]\nname = \"b\"\nbackends = [\"http://x\"]\ntimeouts = {{ connect = \"5 parsecs\" }}\n"
    );
    let e = errors(&text);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("pool[1].timeouts.connect: duration `5 parsecs` has an unknown unit"),
        "{e:?}"
    );
    let text = BASE.replace("[server]\n", "[server]\nlimits = { max_request_body = \"12XB\" }\n");
    let e = errors(&text);
    assert!(e[0].starts_with("server.limits.max_request_body: size `12XB`"), "{e:?}");
}

#[test]
fn syntax_error_has_line_and_column() {
    let e = errors("[server]\nlisten = [\"x\"\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("TOML syntax error at line"), "{e:?}");
}

#[test]
fn wrong_type_names_the_field() {
    let e = errors(&BASE.replace("weight = 2", "weight = \"heavy\""));
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("pool[0].backends[1].weight: invalid type"), "{e:?}");
}

#[test]
fn duplicate_hosts_and_defaults() {
    let text = format!(
        "{BASE}\n[[site]]\nhosts = [\"EXAMPLE.test\"]\ndefault = true\n[[site.route]]\npath = \"/\"\npool = \"app\"\n[[site]]\ndefault = true\n[[site.route]]\npath = \"/\"\npool = \"app\"\n"
    );
    let e = errors(&text);
    assert!(
        e.iter()
            .any(|m| m == "site[1].hosts[0]: host \"EXAMPLE.test\" is already served by site[0]"),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("site[2].default: only one site may be the default")),
        "{e:?}"
    );
}

#[test]
fn admin_token_sources() {
    let lit = format!("{BASE}\n[admin]\nlisten = \"127.0.0.1:9901\"\ntoken = \"s3cret\"\n");
    let v = load(&lit);
    assert!(v.as_ref().is_ok_and(
        |v| v.admin_token.as_deref() == Some("s3cret") && v.warnings.iter().any(|w| w.starts_with("admin.token"))
    ));
    let env = format!("{BASE}\n[admin]\nlisten = \"127.0.0.1:9901\"\ntoken = \"env:RAMPART_TEST_SURELY_UNSET_VAR\"\n");
    assert_eq!(
        errors(&env),
        vec!["admin.token: environment variable RAMPART_TEST_SURELY_UNSET_VAR is not set"]
    );
    let file = format!("{BASE}\n[admin]\nlisten = \"127.0.0.1:9901\"\ntoken = \"file:/nonexistent/token\"\n");
    let e = errors(&file);
    assert!(e[0].starts_with("admin.token: cannot read /nonexistent/token"), "{e:?}");
}

#[test]
fn redacted_serialisation_has_no_token() {
    let lit = format!("{BASE}\n[admin]\nlisten = \"127.0.0.1:9901\"\ntoken = \"s3cret\"\n");
    let v = load(&lit);
    let json = v
        .map(|v| serde_json::to_string(&v.config).unwrap_or_default())
        .unwrap_or_default();
    assert!(json.contains("127.0.0.1:9901"));
    assert!(!json.contains("s3cret"));
}

#[test]
fn suggestions() {
    assert_eq!(suggest("listn", ["listen", "tls"]), Some("listen"));
    assert_eq!(suggest("zzzzzz", ["listen", "tls"]), None);
}

#[test]
fn current_thread_runtime_needs_one_worker() {
    let text = BASE.replace("[server]\n", "[server]\nruntime = \"current_thread\"\nworkers = 2\n");
    let e = errors(&text);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("server.runtime: \"current_thread\" runs one worker"),
        "{e:?}"
    );
    let ok = BASE.replace("[server]\n", "[server]\nruntime = \"multi_thread\"\nworkers = 1\n");
    assert!(load(&ok).is_ok());
    let ok = BASE.replace("[server]\n", "[server]\nruntime = \"per_core\"\nworkers = 2\n");
    assert_eq!(load(&ok).unwrap().config.server.runtime, crate::RuntimeModel::PerCore);
    let bad = BASE.replace("[server]\n", "[server]\nruntime = \"fibers\"\n");
    let e = errors(&bad);
    assert!(e[0].starts_with("server.runtime: unknown variant `fibers`"), "{e:?}");
}

#[test]
fn balance_and_hash_keys() {
    let with = |extra: &str| BASE.replace("weight = 2 }]\n", &format!("weight = 2 }}]\n{extra}\n"));
    assert!(load(&with("balance = \"least_request\"")).is_ok());
    assert!(load(&with("balance = \"consistent_hash\"\nhash_key = \"header:x-user\"")).is_ok());
    assert!(load(&with("balance = \"consistent_hash\"\nhash_key = \"cookie:sid\"")).is_ok());
    assert_eq!(
        errors(&with("balance = \"consistent_hash\"")),
        vec![
            "pool[0].hash_key: consistent_hash needs a key: \"ip\", \"path\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\""
        ]
    );
    let e = errors(&with("balance = \"consistent_hash\"\nhash_key = \"colour:red\""));
    assert!(e[0].starts_with("pool[0].hash_key: `colour:red`: use"), "{e:?}");
    let e = errors(&with("hash_key = \"ip\""));
    assert_eq!(
        e,
        vec!["pool[0].hash_key: applies only to balance = \"consistent_hash\""]
    );
    let e = errors(&with("balance = \"fastest\""));
    assert!(e[0].starts_with("pool[0].balance: unknown variant `fastest`"), "{e:?}");
    let dup = BASE.replace("\"http://127.0.0.1:9000\", {", "\"http://127.0.0.1:9001\", {");
    assert_eq!(
        errors(&dup),
        vec!["pool[0].backends[1].url: `http://127.0.0.1:9001` is listed twice"]
    );
}

#[test]
fn health_settings_are_checked() {
    let with = |extra: &str| BASE.replace("weight = 2 }]\n", &format!("weight = 2 }}]\n{extra}\n"));
    assert!(load(&with("health = { path = \"auto\", interval = \"2s\" }")).is_ok());
    assert!(load(&with("health = { kind = \"tcp\" }\noutlier = { error_rate = 0.5 }")).is_ok());
    let e = errors(&with(
        "health = { path = \"health\", expect = \"2xx\", method = \"GE T\" }",
    ));
    assert!(
        e.iter().any(|m| m.starts_with("pool[0].health.path: must start with")),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.starts_with("pool[0].health.expect:")), "{e:?}");
    assert!(e.iter().any(|m| m.starts_with("pool[0].health.method:")), "{e:?}");
    let e = errors(&with(
        "outlier = { error_rate = 1.5, max_ejected_percent = 101 }\npanic_threshold = 2.0",
    ));
    assert!(e.iter().any(|m| m.starts_with("pool[0].outlier.error_rate:")), "{e:?}");
    assert!(
        e.iter().any(|m| m.starts_with("pool[0].outlier.max_ejected_percent:")),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.starts_with("pool[0].panic_threshold:")), "{e:?}");
    let e = errors(&with("outlier = { ejection_time = \"10m\" }"));
    assert!(e[0].contains("max_ejection_time at least ejection_time"), "{e:?}");
}

#[test]
fn affinity_and_fallback_are_checked() {
    let with = |extra: &str| BASE.replace("weight = 2 }]\n", &format!("weight = 2 }}]\n{extra}\n"));
    assert!(load(&with("affinity = { mode = \"cookie\", ttl = \"1h\" }")).is_ok());
    assert!(load(&with("affinity = { mode = \"ip\" }\nslow_start = \"30s\"")).is_ok());
    let e = errors(&with(
        "affinity = { cookie = \"bad name\", same_site = \"None\", path = \"x\" }",
    ));
    assert!(e.iter().any(|m| m.starts_with("pool[0].affinity.cookie:")), "{e:?}");
    assert!(
        e.iter()
            .any(|m| m.starts_with("pool[0].affinity.secure: SameSite=None")),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.starts_with("pool[0].affinity.path:")), "{e:?}");
    let e = errors(&with("affinity = { key = \"short\" }"));
    assert_eq!(e, vec!["pool[0].affinity.key: must be at least 16 bytes"]);
    assert_eq!(
        errors(&with("fallback = \"ap\"")),
        vec!["pool[0].fallback: no pool named \"ap\" (did you mean \"app\"?)"]
    );
    assert_eq!(
        errors(&with("fallback = \"app\"")),
        vec!["pool[0].fallback: a pool cannot fall back to itself"]
    );
}

#[test]
fn chains_are_checked() {
    let chain = "[[chain]]\nname = \"video\"\nproviders = [{ name = \"cdn-a\", url = \"https://a.example/base\" }]\n";
    let ok = format!("{BASE}\n{chain}").replace("pool = \"app\"\n", "chain = \"video\"\n");
    assert!(load(&ok).is_ok(), "{:?}", errors(&ok));
    let typo = format!("{BASE}\n{chain}").replace("pool = \"app\"\n", "chain = \"vidoe\"\n");
    assert_eq!(
        errors(&typo),
        vec!["site[0].route[0].chain: no chain named \"vidoe\" (did you mean \"video\"?)"]
    );
    let both = format!("{BASE}\n{chain}").replace("pool = \"app\"\n", "pool = \"app\"\n  chain = \"video\"\n");
    assert_eq!(
        errors(&both),
        vec!["site[0].route[0]: set either `pool` or `chain`, not both"]
    );
    let bad = format!(
        "{BASE}\n[[chain]]\nname = \"c\"\nproviders = [{{ name = \"a b\", url = \"ftp://x\" }}, {{ name = \"ok\", url = \"https://x?q=1\" }}]\nfail_on_status = [42]\nroute_key = \"host\"\n"
    );
    let e = errors(&bad);
    for want in [
        "chain[0].providers[0].name:",
        "chain[0].providers[0].url:",
        "chain[0].providers[1].url: `https://x?q=1` must not have a query",
        "chain[0].fail_on_status[0]:",
        "chain[0].route_key:",
    ] {
        assert!(e.iter().any(|m| m.starts_with(want)), "missing {want}: {e:?}");
    }
}

#[test]
fn route_cache_policy_is_checked() {
    let with = |c: &str| BASE.replace("pool = \"app\"\n", &format!("pool = \"app\"\n  cache = {{ {c} }}\n"));
    assert!(load(&with("sort_query = true, key_headers = [\"x-device\"], ttl = \"5m\"")).is_ok());
    let e = errors(&with("ignore_query = [\"a\"], query_allow = [\"b\"]"));
    assert_eq!(
        e,
        vec!["site[0].route[0].cache.query_allow: set either `query_allow` or `ignore_query`, not both"]
    );
    let e = errors(&with("min_ttl = \"10m\", max_ttl = \"1m\""));
    assert_eq!(
        e,
        vec!["site[0].route[0].cache.min_ttl: must not be greater than max_ttl"]
    );
    let e = errors(&with("key_headers = [\"bad header\"]"));
    assert!(e[0].starts_with("site[0].route[0].cache: header `bad header`"), "{e:?}");
}
