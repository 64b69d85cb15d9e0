# shellcheck shell=bash
# Shared helpers for the bench/*.sh scripts. Source it; do not run it.
#
# The sourcing script owns these globals (the helpers read or fill them):
#   WORK      temp dir (removed on exit unless KEEP_TMP=1)
#   PIDS      root PIDs of every long-running process started (stopped on exit)
#   ROOT_PID  NAME -> PID of a started process (assoc. array, declared here)
#   LOG       NAME -> its stderr file (assoc. array, declared here)
# and, for measure(): PORT (NAME -> port), RUN_DIR, BENCH_DIR, THREADS, CONNS,
# DURATION, WARMUP, PIN_LOAD, CLK_TCK.
#
# A script may define cleanup_hook (called first on exit, before any process is
# stopped) to stop things of its own.

SCRIPT_NAME=${0##*/}

die() { echo "$SCRIPT_NAME: $*" >&2; exit 1; }
note() { echo "== $*"; }

# --- Process bookkeeping and cleanup ------------------------------------------
PIDS=()
WORK=""
declare -A ROOT_PID LOG

alive() {  # a PID that exists and is not a zombie
  [[ -r /proc/$1/status ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

descendants() {  # PID and all its descendants, one per line (nginx master + workers)
  local queue=("$1") i=0 child
  while (( i < ${#queue[@]} )); do
    for child in $(ps -o pid= --ppid "${queue[i]}" 2>/dev/null || true); do
      queue+=("$child")
    done
    i=$((i + 1))
  done
  printf '%s\n' "${queue[@]}"
}

forget_pid() {  # PID: drop it from PIDS (it was stopped and reaped by the caller)
  local pid keep=()
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do [[ $pid == "$1" ]] || keep+=("$pid"); done
  PIDS=(${keep[@]+"${keep[@]}"})
}

cleanup() {
  local rc=$? pid all=() waited=0
  trap - EXIT INT TERM
  set +e   # best effort from here on: never stop half-way through cleaning up
  if declare -F cleanup_hook >/dev/null; then cleanup_hook; fi
  # Collect descendants first: if a master dies hard its workers get reparented.
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    mapfile -t -O "${#all[@]}" all < <(descendants "$pid")
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  # Give them up to 5 s to exit cleanly (Rampart drains, nginx stops its workers).
  while (( waited < 50 )); do
    local left=0
    for pid in ${all[@]+"${all[@]}"}; do alive "$pid" && left=1 && break; done
    (( left )) || break
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in ${all[@]+"${all[@]}"}; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
  wait 2>/dev/null || true
  if [[ -n $WORK && -d $WORK ]]; then
    if [[ ${KEEP_TMP:-0} == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}

install_cleanup() {  # stop everything on exit, error, Ctrl-C or TERM
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# --- Checks -------------------------------------------------------------------
need_tools() {  # TOOL...: die unless every tool is on PATH
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y nginx haproxy wrk python3 curl util-linux procps)"
  done
}

setup_pinning() {  # fill PIN_PROXY / PIN_LOAD from PROXY_CPU / LOAD_CPU and check them
  local pin
  PIN_PROXY=(); [[ -n $PROXY_CPU ]] && PIN_PROXY=(taskset -c "$PROXY_CPU")
  PIN_LOAD=();  [[ -n $LOAD_CPU ]] && PIN_LOAD=(taskset -c "$LOAD_CPU")
  for pin in "$PROXY_CPU" "$LOAD_CPU"; do
    [[ -z $pin ]] || taskset -c "$pin" true 2>/dev/null || die "cannot pin to CPU '$pin' (set PROXY_CPU/LOAD_CPU, or empty to disable)"
  done
  return 0
}

ensure_rampart() {  # build the default binary if it is missing (never rebuilds)
  if [[ ! -x $RAMPART_BIN ]]; then
    [[ $RAMPART_BIN == "$DEFAULT_RAMPART_BIN" ]] || die "RAMPART_BIN=$RAMPART_BIN is not executable"
    note "building rampart (cargo build --release -p rampart)"
    (cd "$REPO_DIR" && cargo build --release -p rampart)
  fi
}

ports_free() {  # PORT...: die if anything already listens on one of them
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      die "port $port is in use (set BASE_PORT)"
    fi
  done
}

# --- Run setup ----------------------------------------------------------------
new_run_dir() {  # SUFFIX: the temp dir (WORK) and bench/out/<date-time>SUFFIX (RUN_DIR, linked as latestSUFFIX)
  WORK=$(mktemp -d /tmp/rampart-bench.XXXXXX)
  chmod 755 "$WORK"   # nginx workers run as 'nobody' and must reach their temp dirs
  RUN_DIR=$OUT_DIR/$(date +%Y%m%d-%H%M%S)$1
  mkdir -p "$RUN_DIR"
  ln -sfn "$(basename "$RUN_DIR")" "$OUT_DIR/latest$1"
}

peer_versions() {  # [LINE...]: set NGINX_, WRK_, RAMPART_VERSION and GIT_REV, print them with LINEs
  NGINX_VERSION=$(nginx -v 2>&1)
  WRK_VERSION=$(wrk -v 2>&1 | head -n1 || true)   # wrk -v prints its version then usage, exits 1
  RAMPART_VERSION=$("$RAMPART_BIN" --version 2>&1 || true)
  GIT_REV=$(git -C "$REPO_DIR" describe --always --dirty 2>/dev/null || echo unknown)
  note "peers"
  printf '   %s\n' "$NGINX_VERSION" "$@" "$WRK_VERSION" \
    "$RAMPART_VERSION ($GIT_REV, $RAMPART_BIN)" "$(python3 --version)" \
    "kernel $(uname -r), $(nproc) CPUs, fd limit $NOFILE, CLK_TCK $CLK_TCK"
}

# --- Configs ------------------------------------------------------------------
# nginx keeps temp files under /var/lib/nginx by default; keep each instance self-contained.
nginx_temp_paths() {
  local t=$1
  printf '    client_body_temp_path %s/body;\n    proxy_temp_path %s/proxy;\n' "$t" "$t"
  printf '    fastcgi_temp_path %s/fastcgi;\n    uwsgi_temp_path %s/uwsgi;\n    scgi_temp_path %s/scgi;\n' "$t" "$t" "$t"
}

write_1k_page() {  # DIR: the 1 KiB static file every origin serves, as DIR/1k.html
  mkdir -p "$1"
  head -c 1023 /dev/zero | tr '\0' 'x' >"$1/1k.html"
  echo >>"$1/1k.html"
}

rampart_access() {  # NAME: Rampart's `log.access` value for $WORK/NAME (ACCESS_LOG)
  if [[ $ACCESS_LOG == file ]]; then echo "$WORK/$1/access.log"; else echo off; fi
}

# The scheme clients use towards the proxies: https once make_tls_cert has run.
SCHEME=http

make_tls_cert() {  # DIR: a self-signed P-256 certificate for the proxies' TLS listeners;
  # sets TLS_CERT, TLS_KEY and TLS_PEM (both in one file, for HAProxy) and SCHEME=https
  local dir=$1
  mkdir -p "$dir"
  openssl req -x509 -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -days 2 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null || die "openssl could not make a certificate"
  cat "$dir/cert.pem" "$dir/key.pem" >"$dir/both.pem"
  TLS_CERT=$dir/cert.pem TLS_KEY=$dir/key.pem TLS_PEM=$dir/both.pem SCHEME=https
}

rampart_plain_config() {  # PORT ADMIN_PORT ACCESS ORIGIN_PORT [SERVER_LINE...]: Rampart as a
  # one-backend proxy (the benches' plain Rampart; `workers = 1` unless a line sets it),
  # listening with TLS when make_tls_cert has run
  local port=$1 admin=$2 access=$3 origin=$4; shift 4
  local server=("$@")
  [[ " ${server[*]} " == *" workers = "* ]] || server=("workers = 1" ${server[@]+"${server[@]}"})
  printf '[server]\n'
  if [[ -z ${TLS_CERT:-} ]]; then printf 'listen = ["127.0.0.1:%s"]\n' "$port"; fi
  printf '%s\n' "${server[@]}"
  echo 'header_read_timeout = "120s"'
  if [[ -n ${TLS_CERT:-} ]]; then
    printf '[server.tls]\nlisten = ["127.0.0.1:%s"]\ncertificates = [{ cert = "%s", key = "%s" }]\n' \
      "$port" "$TLS_CERT" "$TLS_KEY"
  fi
  cat <<EOF

[log]
access = "$access"

[admin]
listen = "127.0.0.1:$admin"

[[pool]]
name = "origin"
backends = ["http://127.0.0.1:$origin"]

[[site]]
default = true
  [[site.route]]
  path = "/"
  pool = "origin"
EOF
}

# nginx doing the work Rampart does by default (NGINX_SAME_WORK=1): its nearest to
# Rampart's access-log line, the same fields as JSON where nginx has them (no route
# or attempt count; the upstream's status instead of a reason), and the same fields
# added to requests and responses (X-Forwarded-*, Via, x-request-id).
NGINX_JSON_LOG_FORMAT="log_format rampart_fields escape=json '{\"time\":\"\$time_iso8601\",\"request_id\":\"\$request_id\",\"client_ip\":\"\$remote_addr\",\"host\":\"\$http_host\",\"method\":\"\$request_method\",\"path\":\"\$uri\",\"protocol\":\"\$server_protocol\",\"status\":\$status,\"bytes_in\":\$request_length,\"bytes_out\":\$body_bytes_sent,\"duration_s\":\$request_time,\"site\":\"\$server_name\",\"upstream\":\"\$upstream_addr\",\"upstream_status\":\"\$upstream_status\"}';"

write_nginx_proxy() {  # DIR PORT CONNECTIONS BALANCE ORIGIN_PORT...: nginx (1 worker) as a
  # keep-alive reverse proxy on PORT to the origin ports; BALANCE is an upstream method
  # directive or empty (round robin). Access log: Rampart writes one JSON line per
  # request in batches, so nginx gets a buffered file log (ACCESS_LOG, NGINX_LOG_BUFFER)
  # in its `combined` format, or with NGINX_SAME_WORK=1 the fields of Rampart's line.
  local dir=$1 port=$2 conns=$3 balance=$4 origin servers="" access="access_log off;" format=combined same=""; shift 4
  for origin in "$@"; do
    servers+="
        server 127.0.0.1:$origin;"
  done
  if [[ $ACCESS_LOG == file ]]; then
    if [[ ${NGINX_SAME_WORK:-0} == 1 ]]; then
      access="$NGINX_JSON_LOG_FORMAT
    "
      format=rampart_fields
    else
      access=""
    fi
    access+="access_log $dir/access.log $format${NGINX_LOG_BUFFER:+ buffer=$NGINX_LOG_BUFFER flush=1s};"
  fi
  if [[ ${NGINX_SAME_WORK:-0} == 1 ]]; then
    same='
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header Via "1.1 nginx";
            proxy_set_header X-Request-Id $request_id;
            add_header Via "1.1 nginx" always;
            add_header X-Request-Id $request_id always;'
  fi
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $conns; }
http {
$(nginx_temp_paths "$dir/tmp")
    $access
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    upstream origin {${balance:+
        $balance;}$servers
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$port${TLS_CERT:+ ssl}$([[ ${H2:-0} == 1 ]] && echo " http2") backlog=4096;${TLS_CERT:+
        ssl_certificate $TLS_CERT;
        ssl_certificate_key $TLS_KEY;
        ssl_protocols TLSv1.2 TLSv1.3;}
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";$same
        }
    }
}
EOF
}

write_origin() {  # DIR PORT...: the origin nginx (1 worker) serving DIR/html/1k.html on each port
  local dir=$1 port servers=""; shift
  write_1k_page "$dir/html"
  mkdir -p "$dir/tmp"
  for port in "$@"; do
    # X-Origin-Port says which port answered (pool.sh's spread check).
    servers+="
    server {
        listen 127.0.0.1:$port backlog=4096;
        root $dir/html;
        add_header X-Origin-Port \$server_port;
        location / { try_files /1k.html =404; }
        # A POST (bench/run.sh POST=N) gets the page too: nginx's static files
        # answer POST with 405, which this turns into the page, read with GET.
        error_page 405 =200 \$uri;
    }"
  done
  cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
$(nginx_temp_paths "$dir/tmp")
    access_log off;
    sendfile on;
    open_file_cache max=16 inactive=60s;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    default_type text/html;
$servers
}
EOF
}

# --- Start processes ----------------------------------------------------------
start_bg() {  # NAME STDOUT STDERR CMD...: start in the background, remember its PID
  # (stdout appends, so a log written to it can be truncated while it runs)
  local name=$1 out=$2 err=$3; shift 3
  "$@" >>"$out" 2>"$err" &
  ROOT_PID[$name]=$!
  LOG[$name]=$err
  PIDS+=("$!")
}

wait_http() {  # NAME PORT [SCHEME]: wait until GET / answers 200 with the 1 KiB body
  local name=$1 port=$2 scheme=${3:-$SCHEME} i
  for i in $(seq 100); do
    alive "${ROOT_PID[$name]}" || { tail -n 20 "${LOG[$name]}" >&2; die "$name exited during startup"; }
    if [[ $(curl -sk -o /dev/null -w '%{http_code} %{size_download}' --max-time 1 "$scheme://127.0.0.1:$port/" || true) == "200 1024" ]]; then
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "${LOG[$name]}" >&2
  die "$name did not serve the 1 KiB page on port $port within 10 s"
}

# --- Measurements -------------------------------------------------------------
cpu_ticks() {  # utime+stime (clock ticks) summed over a PID and its descendants
  local pid total=0 t
  for pid in $(descendants "$1"); do
    # Fields after the "(comm)" start at field 3, so utime (14) and stime (15)
    # are $12 and $13; /proc/PID/stat already covers all threads.
    t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
    total=$((total + ${t:-0}))
  done
  echo "$total"
}

rss_kib() {  # VmRSS (KiB) summed over a PID and its descendants
  local pid total=0 r
  for pid in $(descendants "$1"); do
    r=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || r=0
    total=$((total + ${r:-0}))
  done
  echo "$total"
}

load() {  # DURATION URL OUT: drive URL for DURATION; OUT gets a `WRK_JSON {...}` line.
  # wrk (HTTP/1.1, report.lua prints the line), or with H2=1 h2load (HTTP/2, one stream
  # in flight per connection as wrk has one request; h2load_json.py prints the line
  # from h2load's summary and its per-request log)
  local duration=$1 url=$2 out=$3
  # With POST=N (N > 0) every request is a POST with an N-byte body.
  if [[ ${H2:-0} == 1 ]]; then
    local log="$WORK/h2load-requests.tsv" data=()
    if (( ${POST:-0} > 0 )); then
      head -c "$POST" /dev/zero | tr '\0' x >"$WORK/post-body"
      data=(-d "$WORK/post-body")
    fi
    ${PIN_LOAD[@]+"${PIN_LOAD[@]}"} h2load -c"$CONNS" -t"$THREADS" -m1 -D"$duration" "${data[@]}" \
      --log-file="$log" "$url" >"$out.h2load" 2>&1 || return 1
    python3 "$BENCH_DIR/h2load_json.py" "$out.h2load" "$log" >"$out" || return 1
    rm -f "$log"
  else
    local close=()
    if [[ ${CLOSE:-0} == 1 ]]; then close=(-H "Connection: close"); fi
    ${PIN_LOAD[@]+"${PIN_LOAD[@]}"} wrk -t"$THREADS" -c"$CONNS" -d"$duration" --latency "${close[@]}" \
      -s "$BENCH_DIR/report.lua" "$url" >"$out" 2>&1
  fi
}

measure() {  # PROXY ROUND: one warm-up and one measured wrk run -> RUN_DIR/runs.jsonl
  local p=$1 round=$2 url="$SCHEME://127.0.0.1:${PORT[$1]}/" out="$WORK/wrk-$1-$2.txt"
  local before after json rec
  if declare -F before_measure >/dev/null; then before_measure "$p"; fi
  if [[ $WARMUP != 0 ]]; then load "$WARMUP" "$url" /dev/null; fi
  alive "${ROOT_PID[$p]}" || die "$p is not running"
  before=$(cpu_ticks "${ROOT_PID[$p]}")
  load "$DURATION" "$url" "$out" || { cat "$out" >&2; die "the load generator failed against $p"; }
  after=$(cpu_ticks "${ROOT_PID[$p]}")
  json=$(sed -n 's/^WRK_JSON //p' "$out")
  [[ -n $json ]] || { cat "$out" >&2; die "wrk printed no result for $p"; }
  rec=$(printf '{"proxy":"%s","round":%d,"cpu_ticks":%d,"clk_tck":%d,"wrk":%s}' \
    "$p" "$round" "$((after - before))" "$CLK_TCK" "$json")
  echo "$rec" >>"$RUN_DIR/runs.jsonl"
  python3 "$BENCH_DIR/report.py" line "$rec"
}
