#!/usr/bin/env bash
# Benchmark Rampart against nginx and HAProxy as reverse proxies in front of
# one shared nginx origin, all on loopback. See bench/README.md.
#
#   bench/run.sh                      # defaults: -t1 -c50 -d10s, 3 rounds, 10k idle conns
#   DURATION=3s ROUNDS=1 bench/run.sh # quick check
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")

# --- Settings (all overridable from the environment) -------------------------
DEFAULT_RAMPART_BIN=$REPO_DIR/target/release/rampart
RAMPART_BIN=${RAMPART_BIN:-$DEFAULT_RAMPART_BIN}
# The profile-guided build bench/pgo.sh makes; measured as `rampart-pgo` when it exists.
RAMPART_PGO_BIN=${RAMPART_PGO_BIN:-$REPO_DIR/target/pgo/release/rampart}
THREADS=${THREADS:-1}              # wrk threads
CONNS=${CONNS:-50}                 # wrk connections
DURATION=${DURATION:-10s}          # one measured wrk run
WARMUP=${WARMUP:-2s}               # unmeasured wrk run before each measured one; 0 = none
ROUNDS=${ROUNDS:-3}                # rounds of A B C
PROXY_CPU=${PROXY_CPU-0}           # CPU list for the proxies; empty = no pinning
LOAD_CPU=${LOAD_CPU-1}             # CPU list for wrk, the origin and the idle client; empty = no pinning
ACCESS_LOG=${ACCESS_LOG:-file}     # file: every proxy logs each request to a file; off: none do
NGINX_LOG_BUFFER=${NGINX_LOG_BUFFER-64k}  # nginx access_log buffer= (Rampart batches too); empty = unbuffered
ROTATE_LOGS=${ROTATE_LOGS:-1}      # 1: empty a proxy's access log before each of its runs (see bench/README.md)
TLS=${TLS:-0}                      # 1: clients (wrk, the idle test) talk HTTPS to every proxy (HTTP/1.1; a self-signed P-256 certificate)
H2=${H2:-0}                        # 1: HTTP/2 over TLS (sets TLS=1): h2load -m 1 instead of wrk, HTTP/2 idle connections
if [[ $H2 == 1 ]]; then TLS=1; fi
POST=${POST:-0}                    # N > 0: every load request is a POST with an N-byte body (wrk and h2load); the origin answers it with its 1 KiB page
CLOSE=${CLOSE:-0}                  # 1: a new connection for every request (wrk sends Connection: close); with TLS=1, a handshake per request (TLS 1.3, resumed with a ticket)
if [[ $CLOSE == 1 && $H2 == 1 ]]; then echo "CLOSE=1 is for HTTP/1.1 (wrk); h2load keeps its connections" >&2; exit 2; fi
export POST CLOSE
IDLE_CONNS=${IDLE_CONNS:-10000}    # idle keep-alive connections per proxy; 0 skips the memory test
IDLE_CONCURRENCY=${IDLE_CONCURRENCY:-200}  # connections being opened at once by idle_conns.py
IDLE_SETTLE=${IDLE_SETTLE:-3}      # seconds to wait after the last connection is open before reading RSS (Rampart parks idle connections after 250-500 ms)
BASE_PORT=${BASE_PORT:-18080}      # origin = BASE_PORT, proxies = +1 +2 +3, rampart admin = +4
DEFAULT_PROXIES="nginx nginx-same haproxy rampart"
if [[ -x $RAMPART_PGO_BIN ]]; then DEFAULT_PROXIES+=" rampart-pgo"; fi
PROXIES=${PROXIES:-$DEFAULT_PROXIES}  # run order within a round; nginx is the ratio baseline
# nginx-same: the same nginx doing the work Rampart does by default: the fields of
# Rampart's access-log line as JSON (a line as long as Rampart's), X-Forwarded-*, Via
# and x-request-id added to requests and responses; the report also gives the
# ratio to it.
OUT_DIR=${OUT_DIR:-$BENCH_DIR/out}
KEEP_TMP=${KEEP_TMP:-0}            # 1 = keep the temp dir (configs, logs, wrk output)

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"   # die, note, process bookkeeping and cleanup, measure, ...

IDLE_PID=""      # the idle-connection client while it runs
cleanup_hook() { if [[ -n $IDLE_PID ]]; then kill -TERM "$IDLE_PID" 2>/dev/null; fi; }
install_cleanup

# --- Checks -------------------------------------------------------------------
for p in $PROXIES; do
  case $p in nginx|nginx-same|haproxy|rampart) ;; rampart-pgo)
    [[ -x $RAMPART_PGO_BIN ]] || die "rampart-pgo: $RAMPART_PGO_BIN is missing (build it with bench/pgo.sh)" ;;
    *) die "unknown proxy '$p' in PROXIES" ;; esac
done
need_tools nginx haproxy wrk python3 curl taskset ps getconf
if [[ $TLS == 1 ]]; then need_tools openssl; fi
if [[ $H2 == 1 ]]; then need_tools h2load; fi
setup_pinning
ensure_rampart

# 10k idle client sockets live in one process here and in one proxy process:
# raise the fd limit (children inherit it). The hard limit may be lower than
# 65536 on a container; then use all of it.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
if (( IDLE_CONNS > 0 && NOFILE < IDLE_CONNS + 1000 )); then
  echo "warning: fd limit is $NOFILE; $IDLE_CONNS idle connections may not fit" >&2
fi
# HAProxy reserves two fds per connection (client + server side) and refuses
# to start when maxconn*2 does not fit the fd limit. If the hard limit is too
# low for maxconn 20000 (containers often cap it at 20000), lower maxconn to
# what fits and hold the same, smaller number of idle connections on every
# proxy so the comparison stays like for like.
IDLE_CONNS_REQUESTED=$IDLE_CONNS
HAPROXY_MAXCONN=20000
if (( NOFILE < 2 * HAPROXY_MAXCONN + 64 )); then
  HAPROXY_MAXCONN=$(( (NOFILE - 64) / 2 ))
  if [[ " $PROXIES " == *" haproxy "* ]] && (( IDLE_CONNS > HAPROXY_MAXCONN - 50 )); then
    IDLE_CONNS=$(( (HAPROXY_MAXCONN - 50) / 100 * 100 ))
    echo "warning: fd hard limit $NOFILE lets HAProxy take only $HAPROXY_MAXCONN connections;" \
      "holding $IDLE_CONNS idle connections per proxy instead of $IDLE_CONNS_REQUESTED" >&2
  fi
fi
CLK_TCK=$(getconf CLK_TCK)

declare -A PORT=([nginx]=$((BASE_PORT + 1)) [haproxy]=$((BASE_PORT + 2)) [rampart]=$((BASE_PORT + 3)) [nginx-same]=$((BASE_PORT + 5)) [rampart-pgo]=$((BASE_PORT + 6)))
ORIGIN_PORT=$BASE_PORT
ADMIN_PORT=$((BASE_PORT + 4))
PGO_ADMIN_PORT=$((BASE_PORT + 7))
ports_free "$ORIGIN_PORT" "${PORT[@]}" "$ADMIN_PORT" "$PGO_ADMIN_PORT"

new_run_dir "$(if [[ $H2 == 1 ]]; then echo -h2; elif [[ $TLS == 1 ]]; then echo -tls; fi)$(if ((POST > 0)); then echo "-post$POST"; fi)$(if [[ $CLOSE == 1 ]]; then echo -close; fi)"
if [[ $TLS == 1 ]]; then make_tls_cert "$WORK/tls"; fi

# --- Versions -----------------------------------------------------------------
HAPROXY_VERSION=$(haproxy -v 2>&1 | head -n1 || true)
PGO_LINE=()
if [[ " $PROXIES " == *" rampart-pgo "* ]]; then
  PGO_FROM=$(cat "$(dirname "$(dirname "$RAMPART_PGO_BIN")")/built-from" 2>/dev/null || echo unknown)
  PGO_LINE=("rampart-pgo: $RAMPART_PGO_BIN (bench/pgo.sh at $PGO_FROM)")
fi
peer_versions "$HAPROXY_VERSION" ${PGO_LINE[@]+"${PGO_LINE[@]}"}
if [[ -n ${PGO_FROM:-} && $PGO_FROM != "$GIT_REV" ]]; then
  echo "warning: rampart-pgo was built at $PGO_FROM, the checkout is at $GIT_REV (run bench/pgo.sh again)" >&2
fi
note "settings: wrk -t$THREADS -c$CONNS -d$DURATION (warm-up $WARMUP), $ROUNDS round(s), order: $PROXIES"
note "pinning: proxies on CPU '${PROXY_CPU:-any}', wrk + origin + idle client on CPU '${LOAD_CPU:-any}'; access logs: $ACCESS_LOG; clients speak $SCHEME"
note "output: $RUN_DIR"

export NGINX_VERSION HAPROXY_VERSION WRK_VERSION RAMPART_VERSION GIT_REV RAMPART_BIN RAMPART_PGO_BIN THREADS CONNS \
  DURATION WARMUP ROUNDS PROXY_CPU LOAD_CPU ACCESS_LOG NGINX_LOG_BUFFER ROTATE_LOGS TLS H2 IDLE_CONNS IDLE_CONNS_REQUESTED HAPROXY_MAXCONN PROXIES NOFILE CLK_TCK
python3 - "$RUN_DIR/meta.json" <<'EOF'
import json, os, sys, time
e = os.environ
meta = {
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "proxies": e["PROXIES"].split(),
    "versions": {k: e[k.upper() + "_VERSION"] for k in ("nginx", "haproxy", "wrk", "rampart")},
    "rampart_git": e["GIT_REV"], "rampart_bin": e["RAMPART_BIN"],
    "rampart_pgo_bin": e["RAMPART_PGO_BIN"] if "rampart-pgo" in e["PROXIES"].split() else None,
    "settings": {
        "threads": int(e["THREADS"]), "conns": int(e["CONNS"]), "duration": e["DURATION"],
        "warmup": e["WARMUP"], "rounds": int(e["ROUNDS"]), "proxy_cpu": e["PROXY_CPU"],
        "load_cpu": e["LOAD_CPU"], "access_log": e["ACCESS_LOG"],
        "nginx_log_buffer": e["NGINX_LOG_BUFFER"], "rotate_logs": e["ROTATE_LOGS"] == "1", "tls": e["TLS"] == "1", "h2": e["H2"] == "1",
        "post_bytes": int(e["POST"]), "close": e["CLOSE"] == "1",
        "idle_conns": int(e["IDLE_CONNS"]),
        "idle_conns_requested": int(e["IDLE_CONNS_REQUESTED"]), "haproxy_maxconn": int(e["HAPROXY_MAXCONN"]),
        "fd_limit": int(e["NOFILE"]), "clk_tck": int(e["CLK_TCK"]),
    },
}
open(sys.argv[1], "w").write(json.dumps(meta, indent=2) + "\n")
EOF

# --- Configs ------------------------------------------------------------------
mkdir -p "$WORK"/{origin,nginx,nginx-same,haproxy,rampart,rampart-pgo}
for d in origin nginx nginx-same; do mkdir -p "$WORK/$d/tmp"; done

# Origin: 1 KiB static file over keep-alive, cheap enough to stay out of the way.
write_origin "$WORK/origin" "$ORIGIN_PORT"

# nginx as reverse proxy (20,000 connections: the idle test holds 10,000).
write_nginx_proxy "$WORK/nginx" "${PORT[nginx]}" 20000 "" "$ORIGIN_PORT"
NGINX_SAME_WORK=1 write_nginx_proxy "$WORK/nginx-same" "${PORT[nginx-same]}" 20000 "" "$ORIGIN_PORT"

# HAProxy: one thread, keep-alive both sides. Its file-like log target is
# stdout (redirected to a file); each line is one write().
if [[ $ACCESS_LOG == file ]]; then
  HAPROXY_GLOBAL_LOG="log stdout format raw local0 info"
  # dontlognull: like nginx and Rampart, do not log connections that never sent a request.
  HAPROXY_DEFAULTS_LOG=$'log global\n    option httplog\n    option dontlognull'
else
  HAPROXY_GLOBAL_LOG="# no logging"
  HAPROXY_DEFAULTS_LOG="# no logging"
fi
cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $HAPROXY_MAXCONN
    $HAPROXY_GLOBAL_LOG
defaults
    mode http
    $HAPROXY_DEFAULTS_LOG
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-request 120s
    timeout http-keep-alive 120s
frontend bench
    bind 127.0.0.1:${PORT[haproxy]}${TLS_PEM:+ ssl crt $TLS_PEM}$([[ $H2 == 1 ]] && echo " alpn h2,http/1.1")
    default_backend origin
backend origin
    server origin 127.0.0.1:$ORIGIN_PORT
EOF

# Rampart: one worker thread; header_read_timeout also bounds idle keep-alive.
rampart_plain_config "${PORT[rampart]}" "$ADMIN_PORT" "$(rampart_access rampart)" "$ORIGIN_PORT" \
  >"$WORK/rampart/rampart.toml"
rampart_plain_config "${PORT[rampart-pgo]}" "$PGO_ADMIN_PORT" "$(rampart_access rampart-pgo)" "$ORIGIN_PORT" \
  >"$WORK/rampart-pgo/rampart.toml"

nginx -t -q -e "$WORK/origin/error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf" || die "origin nginx config rejected"
nginx -t -q -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" || die "nginx config rejected"
nginx -t -q -e "$WORK/nginx-same/error.log" -p "$WORK/nginx-same" -c "$WORK/nginx-same/nginx.conf" || die "nginx-same config rejected"
haproxy -c -q -f "$WORK/haproxy/haproxy.cfg" || die "haproxy config rejected"
"$RAMPART_BIN" check --config "$WORK/rampart/rampart.toml" >/dev/null || die "rampart config rejected"
if [[ " $PROXIES " == *" rampart-pgo "* ]]; then
  "$RAMPART_PGO_BIN" check --config "$WORK/rampart-pgo/rampart.toml" >/dev/null || die "rampart-pgo config rejected"
fi

# --- Start everything ---------------------------------------------------------
start_bg origin /dev/null "$WORK/origin/stderr.log" ${PIN_LOAD[@]+"${PIN_LOAD[@]}"} \
  nginx -e "$WORK/origin/error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf"
wait_http origin "$ORIGIN_PORT" http

for p in $PROXIES; do
  case $p in
    nginx|nginx-same) start_bg "$p" /dev/null "$WORK/$p/stderr.log" ${PIN_PROXY[@]+"${PIN_PROXY[@]}"} \
             nginx -e "$WORK/$p/error.log" -p "$WORK/$p" -c "$WORK/$p/nginx.conf" ;;
    # -db: stay in the foreground, single process (no master-worker).
    haproxy) start_bg haproxy "$WORK/haproxy/access.log" "$WORK/haproxy/stderr.log" ${PIN_PROXY[@]+"${PIN_PROXY[@]}"} \
               haproxy -db -f "$WORK/haproxy/haproxy.cfg" ;;
    rampart) start_bg rampart /dev/null "$WORK/rampart/stderr.log" ${PIN_PROXY[@]+"${PIN_PROXY[@]}"} \
               "$RAMPART_BIN" edge --config "$WORK/rampart/rampart.toml" ;;
    rampart-pgo) start_bg rampart-pgo /dev/null "$WORK/rampart-pgo/stderr.log" ${PIN_PROXY[@]+"${PIN_PROXY[@]}"} \
               "$RAMPART_PGO_BIN" edge --config "$WORK/rampart-pgo/rampart.toml" ;;
  esac
  wait_http "$p" "${PORT[$p]}"
done
for p in $PROXIES; do
  note "$p: pid(s) $(descendants "${ROOT_PID[$p]}" | paste -sd' '), port ${PORT[$p]}"
done

# --- Measurements (cpu_ticks, rss_kib and measure are in lib.sh) ---------------

# Each run starts with an empty access log, as log rotation keeps one bounded: the
# pages of the last run's log are freed for the next to reuse. (On a fresh VM,
# writing into pages the guest never touched costs several times more system time
# per byte than reusing pages; without this, that cost grows with what the earlier
# runs logged and lands on whichever proxy logs the most bytes.)
before_measure() {  # PROXY
  if [[ $ACCESS_LOG == file && $ROTATE_LOGS == 1 && -f $WORK/$1/access.log ]]; then
    : >"$WORK/$1/access.log"
  fi
}

note "throughput: $ROUNDS round(s), alternating $PROXIES"
for round in $(seq "$ROUNDS"); do
  for p in $PROXIES; do measure "$p" "$round"; done
done

idle_test() {  # PROXY: RSS before and while IDLE_CONNS idle keep-alive connections are held
  local p=$1
  local out="$WORK/idle-$p.txt" before after ready finished i
  sleep 1   # let the previous test's connections finish closing
  before=$(rss_kib "${ROOT_PID[$p]}")
  ${PIN_LOAD[@]+"${PIN_LOAD[@]}"} python3 "$BENCH_DIR/idle_conns.py" --port "${PORT[$p]}" \
    --count "$IDLE_CONNS" --concurrency "$IDLE_CONCURRENCY" --hold-max 300 ${TLS_CERT:+--tls} $([[ $H2 == 1 ]] && echo --h2) >"$out" 2>"$out.err" &
  IDLE_PID=$!
  for i in $(seq 600); do   # at most 5 minutes to open them all
    grep -q '^READY ' "$out" && break
    alive "$IDLE_PID" || { cat "$out" "$out.err" >&2; die "idle_conns.py exited early against $p"; }
    sleep 0.5
  done
  grep -q '^READY ' "$out" || die "idle_conns.py did not open its connections to $p in time"
  sleep "$IDLE_SETTLE"
  after=$(rss_kib "${ROOT_PID[$p]}")
  kill -TERM "$IDLE_PID"
  wait "$IDLE_PID" || true
  IDLE_PID=""
  ready=$(sed -n 's/^READY //p' "$out")
  finished=$(sed -n 's/^DONE //p' "$out")
  [[ -n $finished ]] || finished='{}'   # killed before it could report
  printf '{"proxy":"%s","rss_before_kib":%d,"rss_after_kib":%d,"client":%s,"client_done":%s}\n' \
    "$p" "$before" "$after" "$ready" "$finished" >>"$RUN_DIR/idle.jsonl"
  python3 - "$p" "$before" "$after" "$ready" "$finished" <<'EOF'
import json, sys
p, before, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r, d = json.loads(sys.argv[4]), json.loads(sys.argv[5])
per = (after - before) / r["ok"] if r["ok"] else float("nan")
print(f"  {p:<8} {r['ok']} held ({r['failed']} failed, {d.get('closed_by_server', '?')} closed early), "
      f"RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, {per:.2f} KiB/conn")
for err, n in r["errors"].items():
    print(f"           {n} x {err}")
EOF
}

if (( IDLE_CONNS > 0 )); then
  note "memory: $IDLE_CONNS idle keep-alive connections per proxy"
  # nginx-same is nginx with more fields and a longer log line: its idle connections are nginx's.
  for p in $PROXIES; do [[ $p == nginx-same ]] || idle_test "$p"; done
fi

# --- Sanity: did every proxy log, did Rampart drop log lines? -------------------
if [[ $ACCESS_LOG == file ]]; then
  sleep 1.5   # nginx flushes its buffered log at most every second
  since=""
  if [[ $ROTATE_LOGS == 1 ]]; then since=" (since its last run began)"; fi
  for p in $PROXIES; do
    f=$WORK/$p/access.log
    echo "   $p access log: $(wc -l <"$f" 2>/dev/null || echo 0) lines$since"
  done
fi
for p in rampart rampart-pgo; do
  [[ " $PROXIES " == *" $p "* ]] || continue
  port=$ADMIN_PORT; [[ $p == rampart-pgo ]] && port=$PGO_ADMIN_PORT
  dropped=$(curl -s --max-time 2 "http://127.0.0.1:$port/metrics" | awk '/^rampart_access_log_dropped_total/ {print $2}' || true)
  echo "   $p rampart_access_log_dropped_total: ${dropped:-unknown}"
done

python3 "$BENCH_DIR/report.py" summary "$RUN_DIR" | tee "$RUN_DIR/report.txt"
echo
echo "raw numbers: $RUN_DIR/{runs.csv,idle.csv,summary.json,runs.jsonl,idle.jsonl}"
