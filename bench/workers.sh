#!/usr/bin/env bash
# Runtime model with several workers: CPU per request of one Rampart process with
# its per-core runtimes (one current-thread runtime per worker thread, each with its
# own SO_REUSEPORT sockets; the default), one Rampart process with a work-stealing
# runtime of WORKERS threads, WORKERS single-worker Rampart processes sharing the
# port with SO_REUSEPORT (each pinned to its core), and nginx with WORKERS worker
# processes (reuseport). Everything shares the machine's cores, wrk and the origin
# included: compare CPU per request, not req/s. See bench/README.md.
#
#   bench/workers.sh                        # defaults: WORKERS = cores, -t2 -c100 -d8s, 3 rounds
#   DURATION=3s ROUNDS=1 bench/workers.sh   # quick check
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")

# --- Settings (all overridable from the environment) -------------------------
DEFAULT_RAMPART_BIN=$REPO_DIR/target/release/rampart
RAMPART_BIN=${RAMPART_BIN:-$DEFAULT_RAMPART_BIN}
WORKERS=${WORKERS:-$(nproc)}       # workers of each proxy
THREADS=${THREADS:-2}              # wrk threads
CONNS=${CONNS:-100}                # wrk connections
DURATION=${DURATION:-8s}           # one measured wrk run
WARMUP=${WARMUP:-2s}               # unmeasured wrk run before each measured one; 0 = none
ROUNDS=${ROUNDS:-3}                # rounds of A B C
ACCESS_LOG=${ACCESS_LOG:-file}     # file: every proxy logs each request to a file; off: none do
NGINX_LOG_BUFFER=${NGINX_LOG_BUFFER-64k}  # nginx access_log buffer=; empty = unbuffered
BASE_PORT=${BASE_PORT:-18380}      # origin +0; nginx +1, rampart-mt +2, rampart-pp +3, rampart-pc +4; admin ports from +10
PROXIES=${PROXIES:-nginx rampart-pc rampart-mt rampart-pp}  # run order within a round; nginx is the ratio baseline
OUT_DIR=${OUT_DIR:-$BENCH_DIR/out}
KEEP_TMP=${KEEP_TMP:-0}            # 1 = keep the temp dir (configs, logs, wrk output)
PROXY_CPU=""                       # no pinning of the proxies as a whole (rampart-pp pins each process)
LOAD_CPU=""

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
install_cleanup

# --- Checks -------------------------------------------------------------------
for p in $PROXIES; do
  case $p in nginx|rampart-pc|rampart-mt|rampart-pp) ;; *) die "unknown proxy '$p' in PROXIES" ;; esac
done
need_tools nginx wrk python3 curl taskset ps getconf nproc
setup_pinning
ensure_rampart
(( WORKERS >= 2 )) || die "WORKERS must be at least 2 (one worker is run.sh's comparison)"
(( WORKERS <= $(nproc) )) || die "WORKERS=$WORKERS is more than the $(nproc) cores: rampart-pp pins one process per core"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
CLK_TCK=$(getconf CLK_TCK)

ORIGIN_PORT=$BASE_PORT
declare -A PORT=([nginx]=$((BASE_PORT + 1)) [rampart-mt]=$((BASE_PORT + 2)) [rampart-pp]=$((BASE_PORT + 3)) [rampart-pc]=$((BASE_PORT + 4)))
ADMIN_BASE=$((BASE_PORT + 10))   # rampart-mt: +0; rampart-pp process i: +1+i; rampart-pc: +1+WORKERS
ports_free "$ORIGIN_PORT" "${PORT[@]}" $(seq "$ADMIN_BASE" $((ADMIN_BASE + WORKERS + 1)))

new_run_dir -workers

# --- Versions -----------------------------------------------------------------
peer_versions
note "settings: $WORKERS workers per proxy, wrk -t$THREADS -c$CONNS -d$DURATION (warm-up $WARMUP), $ROUNDS round(s), order: $PROXIES"
note "no pinning except rampart-pp's (process i on CPU i); access logs: $ACCESS_LOG"
note "output: $RUN_DIR"

export NGINX_VERSION WRK_VERSION RAMPART_VERSION GIT_REV RAMPART_BIN WORKERS THREADS CONNS DURATION \
  WARMUP ROUNDS ACCESS_LOG NGINX_LOG_BUFFER PROXIES NOFILE CLK_TCK
python3 - "$RUN_DIR/meta.json" <<'EOF'
import json, os, sys, time
e = os.environ
meta = {
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "kind": "workers",
    "proxies": e["PROXIES"].split(),
    "versions": {k: e[k.upper() + "_VERSION"] for k in ("nginx", "wrk", "rampart")},
    "rampart_git": e["GIT_REV"], "rampart_bin": e["RAMPART_BIN"],
    "settings": {
        "workers": int(e["WORKERS"]), "threads": int(e["THREADS"]), "conns": int(e["CONNS"]),
        "duration": e["DURATION"], "warmup": e["WARMUP"], "rounds": int(e["ROUNDS"]),
        "proxy_cpu": "none (rampart-pp: one process per CPU)", "load_cpu": "none",
        "access_log": e["ACCESS_LOG"], "nginx_log_buffer": e["NGINX_LOG_BUFFER"],
        "fd_limit": int(e["NOFILE"]), "clk_tck": int(e["CLK_TCK"]),
    },
}
open(sys.argv[1], "w").write(json.dumps(meta, indent=2) + "\n")
EOF

# --- Configs ------------------------------------------------------------------
mkdir -p "$WORK"/{origin,nginx,rampart-pc,rampart-mt,rampart-pp}
for d in origin nginx; do mkdir -p "$WORK/$d/tmp"; done
write_origin "$WORK/origin" "$ORIGIN_PORT"

# nginx: run.sh's proxy config with WORKERS worker processes, each with its own
# SO_REUSEPORT listening socket.
write_nginx_proxy "$WORK/nginx" "${PORT[nginx]}" 20000 "" "$ORIGIN_PORT"
sed -i -e "s/^worker_processes 1;/worker_processes $WORKERS;/" \
  -e "s/listen 127.0.0.1:${PORT[nginx]} backlog=4096;/listen 127.0.0.1:${PORT[nginx]} backlog=4096 reuseport;/" \
  "$WORK/nginx/nginx.conf"
grep -q "^worker_processes $WORKERS;" "$WORK/nginx/nginx.conf" && grep -q " reuseport;" "$WORK/nginx/nginx.conf" \
  || die "could not set nginx's workers and reuseport"

log_of() {  # DIR FILE: a log.access value
  if [[ $ACCESS_LOG == file ]]; then echo "$1/$2"; else echo off; fi
}

# rampart-pc: one process, one current-thread runtime per worker thread.
rampart_plain_config "${PORT[rampart-pc]}" $((ADMIN_BASE + 1 + WORKERS)) "$(log_of "$WORK/rampart-pc" access.log)" \
  "$ORIGIN_PORT" "workers = $WORKERS" 'runtime = "per_core"' >"$WORK/rampart-pc/rampart.toml"
# rampart-mt: one process, one work-stealing runtime of WORKERS threads.
rampart_plain_config "${PORT[rampart-mt]}" "$ADMIN_BASE" "$(log_of "$WORK/rampart-mt" access.log)" \
  "$ORIGIN_PORT" "workers = $WORKERS" 'runtime = "multi_thread"' >"$WORK/rampart-mt/rampart.toml"
# rampart-pp: WORKERS processes of one worker (a current-thread runtime) on one port.
for i in $(seq 0 $((WORKERS - 1))); do
  rampart_plain_config "${PORT[rampart-pp]}" $((ADMIN_BASE + 1 + i)) "$(log_of "$WORK/rampart-pp" "access-$i.log")" \
    "$ORIGIN_PORT" "workers = 1" "reuse_port = true" >"$WORK/rampart-pp/rampart-$i.toml"
done

nginx -t -q -e "$WORK/origin/error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf" || die "origin nginx config rejected"
nginx -t -q -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" || die "nginx config rejected"
for f in "$WORK"/rampart-pc/rampart.toml "$WORK"/rampart-mt/rampart.toml "$WORK"/rampart-pp/rampart-*.toml; do
  "$RAMPART_BIN" check --config "$f" >/dev/null || die "$f rejected"
done

# --- Start everything ---------------------------------------------------------
start_bg origin /dev/null "$WORK/origin/stderr.log" \
  nginx -e "$WORK/origin/error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf"
wait_http origin "$ORIGIN_PORT"

for p in $PROXIES; do
  case $p in
    nginx) start_bg nginx /dev/null "$WORK/nginx/stderr.log" \
             nginx -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" ;;
    rampart-pc|rampart-mt) start_bg "$p" /dev/null "$WORK/$p/stderr.log" \
                  "$RAMPART_BIN" edge --config "$WORK/$p/rampart.toml" ;;
    # One parent shell for the processes, so that their CPU is summed under one
    # root and a TERM to it reaches them all.
    rampart-pp) start_bg rampart-pp /dev/null "$WORK/rampart-pp/stderr.log" \
                  bash -c 'trap "kill \$(jobs -p) 2>/dev/null; wait" TERM
                    for ((i = 0; i < $1; i++)); do taskset -c "$i" "$2" edge --config "$3/rampart-$i.toml" & done
                    wait' rampart-pp "$WORKERS" "$RAMPART_BIN" "$WORK/rampart-pp" ;;
  esac
  wait_http "$p" "${PORT[$p]}"
done
if [[ " $PROXIES " == *" rampart-pp "* ]]; then
  # Every process up, not just the first to answer.
  for i in $(seq 0 $((WORKERS - 1))); do
    for t in $(seq 100); do
      curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$((ADMIN_BASE + 1 + i))/readyz" && break
      sleep 0.1
    done
    curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$((ADMIN_BASE + 1 + i))/readyz" || die "rampart-pp process $i did not start"
  done
fi
for p in $PROXIES; do
  note "$p: pid(s) $(descendants "${ROOT_PID[$p]}" | paste -sd' '), port ${PORT[$p]}"
done

# --- Throughput and CPU -------------------------------------------------------
before_measure() {  # PROXY: each run starts with empty access logs (see run.sh)
  local f
  for f in "$WORK/$1"/access*.log; do
    [[ -f $f ]] && : >"$f"
  done
  return 0
}
note "throughput: $ROUNDS round(s), alternating $PROXIES"
for round in $(seq "$ROUNDS"); do
  for p in $PROXIES; do measure "$p" "$round"; done
done

python3 "$BENCH_DIR/report.py" summary "$RUN_DIR" | tee "$RUN_DIR/report.txt"
echo
echo "raw numbers: $RUN_DIR/{runs.csv,summary.json,runs.jsonl}"
