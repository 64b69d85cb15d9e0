#!/usr/bin/env bash
# Failover: Rampart in front of three backends (each its own single-process
# nginx), steady GET load from bench/failover_client.py, while one backend is
# SIGKILLed and restarted every few seconds. Reports non-2xx responses, client
# errors, retries, and how long Rampart's /admin/pools took to show each killed
# backend unhealthy and each restarted one healthy. See bench/README.md.
#
#   bench/failover.sh                  # defaults: 30 s of load, a kill every 5 s, down 3 s
#   DURATION=15s bench/failover.sh     # quick check
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")

# --- Settings (all overridable from the environment) -------------------------
DEFAULT_RAMPART_BIN=$REPO_DIR/target/release/rampart
RAMPART_BIN=${RAMPART_BIN:-$DEFAULT_RAMPART_BIN}
DURATION=${DURATION:-30s}          # length of the GET load
CONCURRENCY=${CONCURRENCY:-20}     # client workers, one keep-alive connection each
KILL_EVERY=${KILL_EVERY:-5s}       # a kill every this long (the first one this long after the load starts)
DOWN_FOR=${DOWN_FOR:-3s}           # how long a killed backend stays down before it is restarted
VICTIM=${VICTIM:-rotate}           # backend to kill: 0, 1, 2, or rotate (0, 1, 2, 0, ...)
BALANCE=${BALANCE:-round_robin}
HEALTH_INTERVAL=${HEALTH_INTERVAL:-1s}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-500ms}
CONSECUTIVE_UP=${CONSECUTIVE_UP:-2}
CONSECUTIVE_DOWN=${CONSECUTIVE_DOWN:-2}
OUTLIER_FAILURES=${OUTLIER_FAILURES:-3}   # passive health: eject after this many failures in a row
EJECTION_TIME=${EJECTION_TIME:-5s}
RETRIES=${RETRIES:-2}
POLL_INTERVAL=${POLL_INTERVAL:-0.05}      # seconds between /admin/pools polls
REQUEST_TIMEOUT=${REQUEST_TIMEOUT:-5}     # client: seconds for one response before it counts as failed
SETTLE_MAX=${SETTLE_MAX:-15}       # after the load, wait up to this many s for every backend to be healthy again
BASE_PORT=${BASE_PORT:-18280}      # backends = +0 +1 +2, rampart = +3, rampart admin = +4
OUT_DIR=${OUT_DIR:-$BENCH_DIR/out}
KEEP_TMP=${KEEP_TMP:-0}            # 1 = keep the temp dir (configs, logs)

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
install_cleanup

secs() {  # "30s", "500ms", "2m" or "30" -> seconds (decimal)
  awk -v d="$1" 'BEGIN {
    if (d ~ /^[0-9.]+ms$/) { sub(/ms$/, "", d); print d / 1000 }
    else if (d ~ /^[0-9.]+s$/) { sub(/s$/, "", d); print d + 0 }
    else if (d ~ /^[0-9.]+m$/) { sub(/m$/, "", d); print d * 60 }
    else if (d ~ /^[0-9.]+$/) { print d + 0 }
    else { exit 1 }
  }' || die "cannot read '$1' as a duration"
}
fsleep_until() {  # EPOCH: sleep until that Unix time (no-op if it has passed)
  sleep "$(awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { d = a - b; if (d < 0) d = 0; printf "%.3f", d }')"
}

# --- Checks -------------------------------------------------------------------
need_tools nginx python3 curl ps awk
ensure_rampart
case $VICTIM in 0|1|2|rotate) ;; *) die "VICTIM must be 0, 1, 2 or rotate" ;; esac
DURATION_S=$(secs "$DURATION"); KILL_EVERY_S=$(secs "$KILL_EVERY"); DOWN_FOR_S=$(secs "$DOWN_FOR")
awk -v k="$KILL_EVERY_S" -v d="$DOWN_FOR_S" 'BEGIN { exit !(d > 0 && k > d) }' \
  || die "need 0 < DOWN_FOR < KILL_EVERY (got DOWN_FOR=$DOWN_FOR KILL_EVERY=$KILL_EVERY)"
[[ ${EPOCHREALTIME:-} == *.* ]] || die "needs bash 5 (EPOCHREALTIME)"

BACKEND_PORTS=("$BASE_PORT" "$((BASE_PORT + 1))" "$((BASE_PORT + 2))")
declare -A PORT=([rampart]=$((BASE_PORT + 3)))
ADMIN_PORT=$((BASE_PORT + 4))
ports_free "${BACKEND_PORTS[@]}" "${PORT[rampart]}" "$ADMIN_PORT"

WORK=$(mktemp -d /tmp/rampart-bench.XXXXXX)
chmod 755 "$WORK"
RUN_DIR=$OUT_DIR/$(date +%Y%m%d-%H%M%S)-failover
mkdir -p "$RUN_DIR"
ln -sfn "$(basename "$RUN_DIR")" "$OUT_DIR/latest-failover"

NGINX_VERSION=$(nginx -v 2>&1)
RAMPART_VERSION=$("$RAMPART_BIN" --version 2>&1 || true)
GIT_REV=$(git -C "$REPO_DIR" describe --always --dirty 2>/dev/null || echo unknown)
note "peers"
printf '   %s\n' "$NGINX_VERSION" "$RAMPART_VERSION ($GIT_REV, $RAMPART_BIN)" "$(python3 --version)" \
  "kernel $(uname -r), $(nproc) CPUs"
note "settings: $CONCURRENCY keep-alive clients for $DURATION; SIGKILL a backend (victim: $VICTIM) every $KILL_EVERY, down $DOWN_FOR"
note "rampart: balance=$BALANCE, health every $HEALTH_INTERVAL (timeout $HEALTH_TIMEOUT, up $CONSECUTIVE_UP, down $CONSECUTIVE_DOWN), outlier $OUTLIER_FAILURES failures / ejection $EJECTION_TIME, retries=$RETRIES"
note "output: $RUN_DIR"

export NGINX_VERSION RAMPART_VERSION GIT_REV RAMPART_BIN DURATION CONCURRENCY KILL_EVERY DOWN_FOR VICTIM BALANCE \
  HEALTH_INTERVAL HEALTH_TIMEOUT CONSECUTIVE_UP CONSECUTIVE_DOWN OUTLIER_FAILURES EJECTION_TIME RETRIES \
  POLL_INTERVAL REQUEST_TIMEOUT
python3 - "$RUN_DIR/meta.json" <<'EOF'
import json, os, sys, time
e = os.environ
meta = {
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "kind": "failover",
    "versions": {"nginx": e["NGINX_VERSION"], "rampart": e["RAMPART_VERSION"]},
    "rampart_git": e["GIT_REV"], "rampart_bin": e["RAMPART_BIN"],
    "settings": {k.lower(): e[k] for k in (
        "DURATION", "CONCURRENCY", "KILL_EVERY", "DOWN_FOR", "VICTIM", "BALANCE", "HEALTH_INTERVAL",
        "HEALTH_TIMEOUT", "CONSECUTIVE_UP", "CONSECUTIVE_DOWN", "OUTLIER_FAILURES", "EJECTION_TIME",
        "RETRIES", "POLL_INTERVAL", "REQUEST_TIMEOUT")},
}
open(sys.argv[1], "w").write(json.dumps(meta, indent=2) + "\n")
EOF

# --- Configs ------------------------------------------------------------------
# Each backend is its own nginx with master_process off: ONE process, so a
# SIGKILL takes the listener and every connection down at once, like a crash.
write_1k_page "$WORK/html"
for i in 0 1 2; do
  mkdir -p "$WORK/b$i/tmp"
  cat >"$WORK/b$i/nginx.conf" <<EOF
master_process off;
worker_processes 1;
daemon off;
pid $WORK/b$i/nginx.pid;
error_log $WORK/b$i/error.log warn;
events { worker_connections 4096; }
http {
$(nginx_temp_paths "$WORK/b$i/tmp")
    access_log off;
    sendfile on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    default_type text/html;
    server {
        listen 127.0.0.1:${BACKEND_PORTS[i]} backlog=4096;
        root $WORK/html;
        add_header X-Origin-Port \$server_port;
        location / { try_files /1k.html =404; }
    }
}
EOF
  nginx -t -q -e "$WORK/b$i/error.log" -p "$WORK/b$i" -c "$WORK/b$i/nginx.conf" 2>/dev/null \
    || nginx -t -e "$WORK/b$i/error.log" -p "$WORK/b$i" -c "$WORK/b$i/nginx.conf" || die "backend $i nginx config rejected"
done

mkdir -p "$WORK/rampart"
cat >"$WORK/rampart/rampart.toml" <<EOF
[server]
listen = ["127.0.0.1:${PORT[rampart]}"]
workers = 1

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[log]
access = "$WORK/rampart/access.log"

[[pool]]
name = "app"
backends = ["http://127.0.0.1:${BACKEND_PORTS[0]}", "http://127.0.0.1:${BACKEND_PORTS[1]}", "http://127.0.0.1:${BACKEND_PORTS[2]}"]
balance = "$BALANCE"
health = { path = "/", interval = "$HEALTH_INTERVAL", jitter = "100ms", timeout = "$HEALTH_TIMEOUT", consecutive_up = $CONSECUTIVE_UP, consecutive_down = $CONSECUTIVE_DOWN }
outlier = { consecutive_failures = $OUTLIER_FAILURES, ejection_time = "$EJECTION_TIME" }
retry = { retries = $RETRIES, on = ["connect_failure", "reset", "timeout"] }

[[site]]
default = true
explain = true   # x-rampart-attempts / x-rampart-reason on every response: the client records them
  [[site.route]]
  path = "/"
  pool = "app"
EOF
"$RAMPART_BIN" check --config "$WORK/rampart/rampart.toml" >/dev/null || die "rampart config rejected"
cp "$WORK/rampart/rampart.toml" "$RUN_DIR/rampart.toml"

# --- Start --------------------------------------------------------------------
start_backend() {  # I: start backend I (again)
  start_bg "b$1" /dev/null "$WORK/b$1/stderr.log" \
    nginx -e "$WORK/b$1/error.log" -p "$WORK/b$1" -c "$WORK/b$1/nginx.conf"
}
event() {  # NAME BACKEND_INDEX EPOCH
  printf '{"event":"%s","backend":"http://127.0.0.1:%s","index":%d,"t":%s}\n' \
    "$1" "${BACKEND_PORTS[$2]}" "$2" "$3" >>"$RUN_DIR/events.jsonl"
}
pools_json() { curl -s --max-time 1 "http://127.0.0.1:$ADMIN_PORT/admin/pools"; }
healthy_count() {
  pools_json | python3 -c 'import json,sys; print(sum(b["healthy"] and b["active_check"] == "passing" for p in json.load(sys.stdin)["pools"] for b in p["backends"]))' 2>/dev/null || echo 0
}

for i in 0 1 2; do start_backend "$i"; done
for i in 0 1 2; do wait_http "b$i" "${BACKEND_PORTS[i]}"; done
start_bg rampart /dev/null "$WORK/rampart/stderr.log" "$RAMPART_BIN" edge --config "$WORK/rampart/rampart.toml"
wait_http rampart "${PORT[rampart]}"
for i in $(seq 100); do [[ $(healthy_count) == 3 ]] && break; sleep 0.2; done
[[ $(healthy_count) == 3 ]] || { pools_json >&2; die "not every backend passed its active checks within 20 s"; }

start_bg watch /dev/null "$WORK/watch.err" \
  python3 "$BENCH_DIR/failover_client.py" watch --admin "127.0.0.1:$ADMIN_PORT" \
    --out "$RUN_DIR/watch.jsonl" --interval "$POLL_INTERVAL"
T0=$EPOCHREALTIME
start_bg load "$WORK/load.out" "$WORK/load.err" \
  python3 "$BENCH_DIR/failover_client.py" load --url "http://127.0.0.1:${PORT[rampart]}/" \
    --out "$RUN_DIR/requests.csv" --concurrency "$CONCURRENCY" --duration "$DURATION_S" --timeout "$REQUEST_TIMEOUT"
printf '{"event":"load_start","t":%s}\n' "$T0" >>"$RUN_DIR/events.jsonl"
note "load running for ${DURATION_S}s"

# --- Controller: kill and restart ----------------------------------------------
k=1
while :; do
  at=$(awk -v t0="$T0" -v k="$k" -v e="$KILL_EVERY_S" 'BEGIN { printf "%.6f", t0 + k * e }')
  # Leave at least a second of load after the last restart.
  awk -v at="$at" -v d="$DOWN_FOR_S" -v t0="$T0" -v dur="$DURATION_S" 'BEGIN { exit !(at + d <= t0 + dur - 1) }' || break
  if [[ $VICTIM == rotate ]]; then v=$(( (k - 1) % 3 )); else v=$VICTIM; fi
  fsleep_until "$at"
  alive "${ROOT_PID[load]}" || { cat "$WORK/load.err" >&2; die "the load client exited early"; }
  pid=${ROOT_PID[b$v]}
  t=$EPOCHREALTIME
  kill -KILL "$pid"
  event kill "$v" "$t"
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
  printf '   t=%6.2fs  SIGKILL backend %d (:%s)\n' "$(awk -v a="$t" -v b="$T0" 'BEGIN { print a - b }')" "$v" "${BACKEND_PORTS[v]}"
  fsleep_until "$(awk -v a="$t" -v d="$DOWN_FOR_S" 'BEGIN { printf "%.6f", a + d }')"
  t=$EPOCHREALTIME
  start_backend "$v"
  event start "$v" "$t"
  for i in $(seq 200); do   # note when it accepts connections again (nginx needs a few ms)
    if (exec 3<>"/dev/tcp/127.0.0.1/${BACKEND_PORTS[v]}") 2>/dev/null; then event listening "$v" "$EPOCHREALTIME"; break; fi
    alive "${ROOT_PID[b$v]}" || { tail -n 5 "$WORK/b$v/error.log" >&2; die "backend $v did not restart"; }
    sleep 0.01
  done
  printf '   t=%6.2fs  restarted backend %d\n' "$(awk -v a="$t" -v b="$T0" 'BEGIN { print a - b }')" "$v"
  k=$((k + 1))
done

wait "${ROOT_PID[load]}" || { cat "$WORK/load.err" >&2; die "the load client failed"; }
sed -n 's/^LOAD_JSON //p' "$WORK/load.out" >"$RUN_DIR/load.json"
[[ -s $RUN_DIR/load.json ]] || { cat "$WORK/load.out" "$WORK/load.err" >&2; die "the load client printed no summary"; }

# Keep watching until every backend is healthy again (the last restart may be recent).
note "load done; waiting up to ${SETTLE_MAX}s for every backend to be healthy"
for i in $(seq $((SETTLE_MAX * 5))); do [[ $(healthy_count) == 3 ]] && break; sleep 0.2; done
sleep 0.2
kill -TERM "${ROOT_PID[watch]}" 2>/dev/null || true
wait "${ROOT_PID[watch]}" 2>/dev/null || true

curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$RUN_DIR/metrics.txt" || true
pools_json >"$RUN_DIR/admin-pools-end.json" || true
metric_sum() {  # NAME: sum over every series of the metric (nothing if there are none)
  awk -v m="$1" '$1 == m || index($1, m "{") == 1 {s += $NF; n++} END { if (n) print s; else print 0 }' "$RUN_DIR/metrics.txt"
}
printf '{"retries_total":%s,"upstream_errors":%s,"panic_requests":%s,"transitions":%s,"healthy_at_end":%s}\n' \
  "$(metric_sum rampart_upstream_retries_total)" "$(metric_sum rampart_upstream_errors_total)" \
  "$(metric_sum rampart_pool_panic_requests_total)" \
  "$(metric_sum rampart_backend_health_transitions_total)" "$(healthy_count)" >"$RUN_DIR/end.json"
# Rampart's view of the non-2xx answers (status >= 300), from its access log.
grep -v '"status":2' "$WORK/rampart/access.log" >"$RUN_DIR/access-non2xx.log" 2>/dev/null || true
note "rampart metrics (non-zero series)"
grep -E '^rampart_(upstream_retries|upstream_errors|backend_health_transitions|pool_panic_requests)' "$RUN_DIR/metrics.txt" \
  | awk '$NF != 0' | sort | sed 's/^/   /' || true

python3 "$BENCH_DIR/failover_client.py" report "$RUN_DIR" | tee "$RUN_DIR/report.txt"
echo
echo "raw data: $RUN_DIR/{requests.csv,events.jsonl,watch.jsonl,load.json,end.json,metrics.txt,summary.json}"
