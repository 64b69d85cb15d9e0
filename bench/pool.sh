#!/usr/bin/env bash
# CPU cost of load balancing: Rampart with a 3-backend pool (least_request,
# active health checks) against Rampart's plain one-backend proxy (run.sh's
# config) and nginx with a 3-server upstream (least_conn, keepalive), all on
# loopback, alternating rounds. See bench/README.md.
#
#   bench/pool.sh                        # defaults: -t1 -c50 -d10s, 3 rounds
#   DURATION=3s ROUNDS=1 bench/pool.sh   # quick check
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
ROUNDS=${ROUNDS:-3}                # rounds of A B C
PROXY_CPU=${PROXY_CPU-0}           # CPU list for the proxies; empty = no pinning
LOAD_CPU=${LOAD_CPU-1}             # CPU list for wrk and the origins; empty = no pinning
ACCESS_LOG=${ACCESS_LOG:-file}     # file: every proxy logs each request to a file; off: none do
NGINX_LOG_BUFFER=${NGINX_LOG_BUFFER-64k}  # nginx access_log buffer= (Rampart batches too); empty = unbuffered
BALANCE=${BALANCE:-least_request}  # Rampart pool balance
NGINX_BALANCE=${NGINX_BALANCE-least_conn}  # nginx upstream method directive; empty = round robin
HEALTH_INTERVAL=${HEALTH_INTERVAL:-1s}     # Rampart pool active check interval (3 backends)
BASE_PORT=${BASE_PORT:-18180}      # origins = +0 +1 +2; nginx-pool +3, rampart-plain +4, rampart-pool +5; admin +6 +7
PROXIES=${PROXIES:-rampart-plain rampart-pool nginx-pool}  # run order within a round
OUT_DIR=${OUT_DIR:-$BENCH_DIR/out}
KEEP_TMP=${KEEP_TMP:-0}            # 1 = keep the temp dir (configs, logs, wrk output)

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
install_cleanup

# --- Checks -------------------------------------------------------------------
for p in $PROXIES; do
  case $p in rampart-plain|rampart-pool|nginx-pool) ;; *) die "unknown proxy '$p' in PROXIES" ;; esac
done
need_tools nginx wrk python3 curl taskset ps getconf
setup_pinning
ensure_rampart
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
CLK_TCK=$(getconf CLK_TCK)

ORIGIN_PORTS=("$BASE_PORT" "$((BASE_PORT + 1))" "$((BASE_PORT + 2))")
declare -A PORT=([nginx-pool]=$((BASE_PORT + 3)) [rampart-plain]=$((BASE_PORT + 4)) [rampart-pool]=$((BASE_PORT + 5)))
declare -A ADMIN=([rampart-plain]=$((BASE_PORT + 6)) [rampart-pool]=$((BASE_PORT + 7)))
ports_free "${ORIGIN_PORTS[@]}" "${PORT[@]}" "${ADMIN[@]}"

new_run_dir -pool

# --- Versions -----------------------------------------------------------------
peer_versions
note "settings: wrk -t$THREADS -c$CONNS -d$DURATION (warm-up $WARMUP), $ROUNDS round(s), order: $PROXIES"
note "pools: rampart-pool balance=$BALANCE, health checks every $HEALTH_INTERVAL; nginx-pool ${NGINX_BALANCE:-round robin}; 3 origins on ports ${ORIGIN_PORTS[*]}"
note "pinning: proxies on CPU '${PROXY_CPU:-any}', wrk + origins on CPU '${LOAD_CPU:-any}'; access logs: $ACCESS_LOG"
note "output: $RUN_DIR"

export NGINX_VERSION WRK_VERSION RAMPART_VERSION GIT_REV RAMPART_BIN THREADS CONNS DURATION WARMUP ROUNDS \
  PROXY_CPU LOAD_CPU ACCESS_LOG NGINX_LOG_BUFFER BALANCE NGINX_BALANCE HEALTH_INTERVAL PROXIES NOFILE CLK_TCK
python3 - "$RUN_DIR/meta.json" <<'EOF'
import json, os, sys, time
e = os.environ
meta = {
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "kind": "pool",
    "proxies": e["PROXIES"].split(),
    "versions": {k: e[k.upper() + "_VERSION"] for k in ("nginx", "wrk", "rampart")},
    "rampart_git": e["GIT_REV"], "rampart_bin": e["RAMPART_BIN"],
    "settings": {
        "threads": int(e["THREADS"]), "conns": int(e["CONNS"]), "duration": e["DURATION"],
        "warmup": e["WARMUP"], "rounds": int(e["ROUNDS"]), "proxy_cpu": e["PROXY_CPU"],
        "load_cpu": e["LOAD_CPU"], "access_log": e["ACCESS_LOG"],
        "nginx_log_buffer": e["NGINX_LOG_BUFFER"], "balance": e["BALANCE"],
        "nginx_balance": e["NGINX_BALANCE"] or "round_robin", "health_interval": e["HEALTH_INTERVAL"],
        "fd_limit": int(e["NOFILE"]), "clk_tck": int(e["CLK_TCK"]),
    },
}
open(sys.argv[1], "w").write(json.dumps(meta, indent=2) + "\n")
EOF

# --- Configs ------------------------------------------------------------------
mkdir -p "$WORK"/{origin,nginx-pool,rampart-plain,rampart-pool}
for d in origin nginx-pool; do mkdir -p "$WORK/$d/tmp"; done

# Origins: one nginx (1 worker) with three server blocks, one per backend port,
# each serving the same 1 KiB static file over keep-alive. X-Origin-Port says
# which one answered (used for the spread check at the end).
write_origin "$WORK/origin" "${ORIGIN_PORTS[@]}"

# nginx with a 3-server upstream. Open-source nginx has no active health
# checks; it marks a server down passively (max_fails=1 fail_timeout=10s by default).
write_nginx_proxy "$WORK/nginx-pool" "${PORT[nginx-pool]}" 4096 "$NGINX_BALANCE" "${ORIGIN_PORTS[@]}"


# Rampart plain: exactly run.sh's config (one worker, one backend, no health checks).
rampart_plain_config "${PORT[rampart-plain]}" "${ADMIN[rampart-plain]}" "$(rampart_access rampart-plain)" \
  "${ORIGIN_PORTS[0]}" >"$WORK/rampart-plain/rampart.toml"

# Rampart pool: the same, with three backends, a balancer and active checks.
# Passive health (outlier) and retries keep their defaults (on).
cat >"$WORK/rampart-pool/rampart.toml" <<EOF
[server]
listen = ["127.0.0.1:${PORT[rampart-pool]}"]
workers = 1
header_read_timeout = "120s"

[log]
access = "$(rampart_access rampart-pool)"

[admin]
listen = "127.0.0.1:${ADMIN[rampart-pool]}"

[[pool]]
name = "app"
backends = ["http://127.0.0.1:${ORIGIN_PORTS[0]}", "http://127.0.0.1:${ORIGIN_PORTS[1]}", "http://127.0.0.1:${ORIGIN_PORTS[2]}"]
balance = "$BALANCE"
health = { path = "/", interval = "$HEALTH_INTERVAL", jitter = "100ms", timeout = "500ms", consecutive_up = 2, consecutive_down = 2 }

[[site]]
default = true
  [[site.route]]
  path = "/"
  pool = "app"
EOF

nginx -t -q -e "$WORK/origin/error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf" || die "origin nginx config rejected"
nginx -t -q -e "$WORK/nginx-pool/error.log" -p "$WORK/nginx-pool" -c "$WORK/nginx-pool/nginx.conf" || die "nginx-pool config rejected"
for p in rampart-plain rampart-pool; do
  "$RAMPART_BIN" check --config "$WORK/$p/rampart.toml" >/dev/null || die "$p config rejected"
done

# --- Start everything ---------------------------------------------------------
start_bg origin /dev/null "$WORK/origin/stderr.log" ${PIN_LOAD[@]+"${PIN_LOAD[@]}"} \
  nginx -e "$WORK/origin/error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf"
for port in "${ORIGIN_PORTS[@]}"; do wait_http origin "$port"; done

for p in $PROXIES; do
  case $p in
    nginx-pool) start_bg "$p" /dev/null "$WORK/$p/stderr.log" ${PIN_PROXY[@]+"${PIN_PROXY[@]}"} \
                  nginx -e "$WORK/$p/error.log" -p "$WORK/$p" -c "$WORK/$p/nginx.conf" ;;
    rampart-*) start_bg "$p" /dev/null "$WORK/$p/stderr.log" ${PIN_PROXY[@]+"${PIN_PROXY[@]}"} \
                 "$RAMPART_BIN" edge --config "$WORK/$p/rampart.toml" ;;
  esac
done
for p in $PROXIES; do wait_http "$p" "${PORT[$p]}"; done

pool_json() { curl -s --max-time 2 "http://127.0.0.1:${ADMIN[rampart-pool]}/admin/pools"; }

if [[ " $PROXIES " == *" rampart-pool "* ]]; then
  # Wait for the active checks to mark every backend healthy, so no round runs
  # on a partly-initialised pool (consecutive_up = 2 takes about 2 intervals).
  for i in $(seq 100); do
    healthy=$(pool_json | python3 -c 'import json,sys; print(sum(b["healthy"] and b["active_check"] == "passing" for p in json.load(sys.stdin)["pools"] for b in p["backends"]))' 2>/dev/null || echo 0)
    [[ $healthy == 3 ]] && break
    sleep 0.2
  done
  [[ $healthy == 3 ]] || { pool_json >&2; die "rampart-pool: not every backend passed its active checks within 20 s"; }
fi

# --- Throughput and CPU -------------------------------------------------------
note "throughput: $ROUNDS round(s), alternating $PROXIES"
for round in $(seq "$ROUNDS"); do
  for p in $PROXIES; do measure "$p" "$round"; done
done

# --- Sanity checks ------------------------------------------------------------
note "sanity"
# Do the pools spread requests? 60 sequential requests each, by answering origin port.
for p in rampart-pool nginx-pool; do
  [[ " $PROXIES " == *" $p "* ]] || continue
  spread=$(for _ in $(seq 60); do
      curl -s -o /dev/null -D - --max-time 2 "http://127.0.0.1:${PORT[$p]}/" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-origin-port" {print $2}'
    done | sort | uniq -c | awk '{printf "%s:%s ", $2, $1}')
  echo "   $p spread of 60 sequential requests (origin port:count): ${spread:-none}"
  printf '{"proxy":"%s","spread":"%s"}\n' "$p" "$spread" >>"$RUN_DIR/spread.jsonl"
done
if [[ $ACCESS_LOG == file ]]; then
  sleep 1.5   # nginx flushes its buffered log at most every second
  for p in $PROXIES; do
    echo "   $p access log: $(wc -l <"$WORK/$p/access.log" 2>/dev/null || echo 0) lines"
  done
fi
for p in rampart-plain rampart-pool; do
  [[ " $PROXIES " == *" $p "* ]] || continue
  curl -s --max-time 2 "http://127.0.0.1:${ADMIN[$p]}/metrics" >"$RUN_DIR/$p-metrics.txt" || true
  for m in rampart_access_log_dropped_total rampart_upstream_retries_total rampart_backend_health_transitions_total; do
    v=$(awk -v m="$m" '$1 == m || index($1, m "{") == 1 {s += $NF; n++} END {if (n) print s}' "$RUN_DIR/$p-metrics.txt")
    echo "   $p $m: ${v:-0}"
  done
done
if [[ " $PROXIES " == *" rampart-pool "* ]]; then
  pool_json >"$RUN_DIR/rampart-pool-admin-pools.json" || true
  python3 - "$RUN_DIR/rampart-pool-admin-pools.json" <<'EOF'
import json, sys
for p in json.load(open(sys.argv[1]))["pools"]:
    for b in p["backends"]:
        print(f"   rampart-pool {b['url']}: healthy={b['healthy']} active_check={b['active_check']} circuit={b['circuit']}")
EOF
fi

python3 "$BENCH_DIR/pool_report.py" "$RUN_DIR" | tee "$RUN_DIR/report.txt"
echo
echo "raw numbers: $RUN_DIR/{runs.csv,summary.json,runs.jsonl,meta.json}"
