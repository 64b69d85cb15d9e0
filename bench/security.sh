#!/usr/bin/env bash
# CPU cost of the security stages: Rampart's plain proxy (run.sh's config)
# against the same proxy with 100 custom WAF rules (none matching, so every
# rule is evaluated on every request) and with a rate limit counting every
# request (never refusing), alternating rounds in one run. nginx as a proxy is
# measured too, for scale. See bench/README.md.
#
#   bench/security.sh                        # defaults: -t1 -c50 -d10s, 3 rounds
#   DURATION=3s ROUNDS=1 bench/security.sh   # quick check
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")

# --- Settings (all overridable from the environment) -------------------------
DEFAULT_RAMPART_BIN=$REPO_DIR/target/release/rampart
RAMPART_BIN=${RAMPART_BIN:-$DEFAULT_RAMPART_BIN}
THREADS=${THREADS:-1}              # wrk threads
CONNS=${CONNS:-50}                 # wrk connections
DURATION=${DURATION:-10s}          # one measured wrk run
WARMUP=${WARMUP:-2s}               # unmeasured wrk run before each measured one; 0 = none
ROUNDS=${ROUNDS:-3}                # rounds
PROXY_CPU=${PROXY_CPU-0}           # CPU list for the proxies; empty = no pinning
LOAD_CPU=${LOAD_CPU-1}             # CPU list for wrk and the origin; empty = no pinning
ACCESS_LOG=${ACCESS_LOG:-off}      # file: every proxy logs each request to a file; off: none do
NGINX_LOG_BUFFER=${NGINX_LOG_BUFFER-64k}
RULES=${RULES:-100}                # WAF rules in rampart-waf
BASE_PORT=${BASE_PORT:-18280}      # origin +0; nginx +1, rampart-plain +2, rampart-waf +3, rampart-ratelimit +4
PROXIES=${PROXIES:-rampart-plain rampart-waf rampart-ratelimit nginx}
OUT_DIR=${OUT_DIR:-$BENCH_DIR/out}
KEEP_TMP=${KEEP_TMP:-0}

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
install_cleanup

for p in $PROXIES; do
  case $p in rampart-plain|rampart-waf|rampart-ratelimit|nginx) ;; *) die "unknown proxy '$p' in PROXIES" ;; esac
done
need_tools nginx wrk python3 curl taskset ps getconf
setup_pinning
ensure_rampart
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
CLK_TCK=$(getconf CLK_TCK)

ORIGIN_PORT=$BASE_PORT
declare -A PORT=([nginx]=$((BASE_PORT + 1)) [rampart-plain]=$((BASE_PORT + 2)) [rampart-waf]=$((BASE_PORT + 3)) [rampart-ratelimit]=$((BASE_PORT + 4)))
ports_free "$ORIGIN_PORT" "${PORT[@]}"

new_run_dir -security
peer_versions
note "settings: wrk -t$THREADS -c$CONNS -d$DURATION (warm-up $WARMUP), $ROUNDS round(s), order: $PROXIES; $RULES WAF rules"
note "pinning: proxies on CPU '${PROXY_CPU:-any}', wrk + origin on CPU '${LOAD_CPU:-any}'; access logs: $ACCESS_LOG"
note "output: $RUN_DIR"

export NGINX_VERSION WRK_VERSION RAMPART_VERSION GIT_REV RAMPART_BIN THREADS CONNS DURATION WARMUP ROUNDS \
  PROXY_CPU LOAD_CPU ACCESS_LOG RULES PROXIES NOFILE CLK_TCK
python3 - "$RUN_DIR/meta.json" <<'EOF'
import json, os, sys, time
e = os.environ
meta = {
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "kind": "security",
    "proxies": e["PROXIES"].split(),
    "versions": {k: e[k.upper() + "_VERSION"] for k in ("nginx", "wrk", "rampart")},
    "rampart_git": e["GIT_REV"], "rampart_bin": e["RAMPART_BIN"],
    "settings": {
        "threads": int(e["THREADS"]), "conns": int(e["CONNS"]), "duration": e["DURATION"],
        "warmup": e["WARMUP"], "rounds": int(e["ROUNDS"]), "proxy_cpu": e["PROXY_CPU"],
        "load_cpu": e["LOAD_CPU"], "access_log": e["ACCESS_LOG"], "rules": int(e["RULES"]),
        "fd_limit": int(e["NOFILE"]), "clk_tck": int(e["CLK_TCK"]),
    },
}
open(sys.argv[1], "w").write(json.dumps(meta, indent=2) + "\n")
EOF

# --- Configs ------------------------------------------------------------------
mkdir -p "$WORK"/{origin,nginx,rampart-plain,rampart-waf,rampart-ratelimit}
for d in origin nginx; do mkdir -p "$WORK/$d/tmp"; done
write_origin "$WORK/origin" "$ORIGIN_PORT"

write_nginx_proxy "$WORK/nginx" "${PORT[nginx]}" 4096 "" "$ORIGIN_PORT"

rampart_config() {  # NAME EXTRA_TOP ROUTE_EXTRA: run.sh's plain config plus the extras
  cat <<EOF
[server]
listen = ["127.0.0.1:${PORT[$1]}"]
workers = 1
header_read_timeout = "120s"

[log]
access = "$(rampart_access "$1")"
$2
[[pool]]
name = "origin"
backends = ["http://127.0.0.1:$ORIGIN_PORT"]

[[site]]
default = true
  [[site.route]]
  path = "/"
  pool = "origin"
  $3
EOF
}

# 100 rules of the kinds operators write, none matching wrk's GET /: exact
# paths, case-folded user-agent substrings, header tests, regexes on the
# decoded query, and IP sets.
waf_rules() {
  local i kind expr
  echo "[waf]"
  for i in $(seq "$RULES"); do
    kind=$((i % 5))
    case $kind in
      0) expr="http.request.uri.path eq \"/blocked/$i\"" ;;
      1) expr="lower(http.user_agent) contains \"badbot-$i\"" ;;
      2) expr="http.request.headers[\"x-attack-$i\"] ne \"\" and http.request.method eq \"POST\"" ;;
      3) expr="lower(url_decode(http.request.uri.query)) matches \"union\\\\s+select\\\\s+$i\"" ;;
      4) expr="ip.src in {198.51.100.$((i % 250))/32 2001:db8::$i}" ;;
    esac
    printf '[[waf.rule]]\nid = "r%d"\nexpression = %s\naction = "block"\n' "$i" "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$expr")"
  done
}

rampart_config rampart-plain "" "" >"$WORK/rampart-plain/rampart.toml"
rampart_config rampart-waf "$(waf_rules)" "" >"$WORK/rampart-waf/rampart.toml"
rampart_config rampart-ratelimit $'[[rate_limit]]\nname = "every"\nkey = "ip"\nrate = "100000000/s"\nburst = 100000000\n' \
  'rate_limits = ["every"]' >"$WORK/rampart-ratelimit/rampart.toml"

nginx -t -q -e "$WORK/origin/error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf" || die "origin nginx config rejected"
nginx -t -q -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" || die "nginx config rejected"
for p in rampart-plain rampart-waf rampart-ratelimit; do
  "$RAMPART_BIN" check --config "$WORK/$p/rampart.toml" >/dev/null || die "$p config rejected"
done
grep -c '^\[\[waf.rule\]\]' "$WORK/rampart-waf/rampart.toml" | xargs -I{} echo "   rampart-waf: {} rules"

# --- Start everything ---------------------------------------------------------
start_bg origin /dev/null "$WORK/origin/stderr.log" ${PIN_LOAD[@]+"${PIN_LOAD[@]}"} \
  nginx -e "$WORK/origin/error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf"
wait_http origin "$ORIGIN_PORT"
for p in $PROXIES; do
  case $p in
    nginx) start_bg nginx /dev/null "$WORK/nginx/stderr.log" ${PIN_PROXY[@]+"${PIN_PROXY[@]}"} \
             nginx -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" ;;
    rampart-*) start_bg "$p" /dev/null "$WORK/$p/stderr.log" ${PIN_PROXY[@]+"${PIN_PROXY[@]}"} \
                 "$RAMPART_BIN" edge --config "$WORK/$p/rampart.toml" ;;
  esac
done
for p in $PROXIES; do wait_http "$p" "${PORT[$p]}"; done
# The rules must be live (a matching request is refused) and not match wrk's
# GET /; the rate limit must count without refusing.
if [[ " $PROXIES " == *" rampart-waf "* ]]; then
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[rampart-waf]}/blocked/5")
  [[ $code == 403 ]] || die "rampart-waf: /blocked/5 answered $code, not 403: the rules are not applied"
fi
if [[ " $PROXIES " == *" rampart-ratelimit "* ]]; then
  curl -s -D - -o /dev/null "http://127.0.0.1:${PORT[rampart-ratelimit]}/" | grep -qi '^ratelimit:' \
    || die "rampart-ratelimit: no RateLimit header, so the rule is not applied"
fi

# --- Throughput and CPU -------------------------------------------------------
note "throughput: $ROUNDS round(s), alternating $PROXIES"
for round in $(seq "$ROUNDS"); do
  for p in $PROXIES; do measure "$p" "$round"; done
done

python3 "$BENCH_DIR/security_report.py" "$RUN_DIR"
if [[ $KEEP_TMP == 1 ]]; then note "kept $WORK"; fi
