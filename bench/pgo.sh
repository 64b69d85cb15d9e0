#!/usr/bin/env bash
# Build Rampart with profile-guided optimisation (PGO): an instrumented build serves a
# training load on loopback, LLVM merges what it counted, and a release build uses the
# counts to lay out and inline the hot paths. See bench/README.md ("PGO build").
#
#   bench/pgo.sh                      # -> target/pgo/release/rampart
#   TRAIN=3s bench/pgo.sh             # shorter training phases
#
# Needs what bench/run.sh needs (nginx as the origin, wrk, curl, openssl; h2load for the
# HTTP/2 phase, skipped without it) and llvm-profdata matching rustc's LLVM (the
# `llvm-tools` rustup component; installed if missing and rustup can reach its server).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")

TRAIN=${TRAIN:-8s}                 # the main phase (keep-alive GETs); the others take TRAIN_SHORT each
TRAIN_SHORT=${TRAIN_SHORT:-3s}
CONNS=${CONNS:-50}
GEN_TARGET=${GEN_TARGET:-$REPO_DIR/target/pgo-gen}   # the instrumented build
OUT_TARGET=${OUT_TARGET:-$REPO_DIR/target/pgo}       # the optimised build: $OUT_TARGET/release/rampart
BASE_PORT=${BASE_PORT:-18180}      # origin, plain, TLS, admin: BASE_PORT .. +3
KEEP_TMP=${KEEP_TMP:-0}

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
install_cleanup

need_tools nginx wrk curl openssl cargo rustc
ORIGIN_PORT=$BASE_PORT PLAIN_PORT=$((BASE_PORT + 1)) TLS_PORT=$((BASE_PORT + 2)) ADMIN_PORT=$((BASE_PORT + 3))
ports_free "$ORIGIN_PORT" "$PLAIN_PORT" "$TLS_PORT" "$ADMIN_PORT"

# --- llvm-profdata of rustc's own LLVM -------------------------------------------
SYSROOT=$(rustc --print sysroot)
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$SYSROOT/lib/rustlib/$HOST/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
  note "installing llvm-profdata (rustup component add llvm-tools)"
  rustup component add llvm-tools >/dev/null 2>&1 || true
fi
[[ -x $PROFDATA ]] || die "llvm-profdata not found at $PROFDATA (rustup component add llvm-tools)"
note "$("$PROFDATA" --version | grep -i 'llvm version' | sed 's/^ *//') ($(rustc --version))"

WORK=$(mktemp -d /tmp/rampart-pgo.XXXXXX)
chmod 755 "$WORK"   # nginx workers run as 'nobody'
PROFILES=$WORK/profiles
mkdir -p "$PROFILES" "$WORK/origin" "$WORK/plain" "$WORK/features"

# --- 1. The instrumented build -----------------------------------------------------
note "instrumented build ($GEN_TARGET)"
(cd "$REPO_DIR" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PROFILES" \
  cargo build --release --locked -p rampart --target-dir "$GEN_TARGET")
GEN_BIN=$GEN_TARGET/release/rampart
rm -f "$PROFILES"/*.profraw   # build scripts ran instrumented too: only the edge's counts count

# --- 2. Training ---------------------------------------------------------------------
write_origin "$WORK/origin" "$ORIGIN_PORT"
start_bg origin /dev/null "$WORK/origin/stderr.log" \
  nginx -e "$WORK/origin/error.log" -p "$WORK/origin" -c "$WORK/origin/nginx.conf"
wait_http origin "$ORIGIN_PORT" http
make_tls_cert "$WORK/tls"   # sets TLS_CERT, TLS_KEY and SCHEME=https

# One edge per phase set, each writing its counts into one file per binary (%m: the
# runtime merges runs of the same binary into it).
export LLVM_PROFILE_FILE=$PROFILES/rampart-%m.profraw

# Both configs are bench/run.sh's plain proxy (rampart_plain_config: the TLS listener
# and a plain one beside it); the second adds the features on a site of its own.
PLAIN_LISTEN="listen = [\"127.0.0.1:$PLAIN_PORT\"]"
rampart_plain_config "$TLS_PORT" "$ADMIN_PORT" "$WORK/plain/access.log" "$ORIGIN_PORT" "$PLAIN_LISTEN" \
  >"$WORK/plain/rampart.toml"

# The features: a cached route, WAF rules, a rate limit, a site that explains itself.
FEATURES_HOST=features.test
{ rampart_plain_config "$TLS_PORT" "$ADMIN_PORT" "$WORK/features/access.log" "$ORIGIN_PORT" "$PLAIN_LISTEN"
  cat <<EOF

[cache]
memory_size = "64MiB"

[[waf.rule]]
id = "scanners"
expression = 'lower(http.user_agent) contains "sqlmap"'
action = "block"

[[waf.rule]]
id = "sqli-query"
expression = 'lower(url_decode(http.request.uri.query)) matches "union\\\\s+select"'
action = "block"

[[rate_limit]]
name = "per-client"
key = "ip"
rate = "100000/s"
burst = 100000

[[site]]
hosts = ["$FEATURES_HOST"]
explain = true
  [[site.route]]
  path = "/"
  pool = "origin"
  [[site.route]]
  path = "/cached/"
  pool = "origin"
  cache = { enabled = true, min_ttl = "60s" }
  [[site.route]]
  path = "/limited/"
  pool = "origin"
  rate_limits = ["per-client"]
EOF
} >"$WORK/features/rampart.toml"

for c in plain features; do
  "$GEN_BIN" check --config "$WORK/$c/rampart.toml" >/dev/null || die "the $c training config was rejected"
done

run_edge() {  # NAME: start the instrumented edge with NAME's config and wait for both listeners
  start_bg "$1" /dev/null "$WORK/$1/stderr.log" "$GEN_BIN" edge --config "$WORK/$1/rampart.toml"
  wait_http "$1" "$PLAIN_PORT" http
  wait_http "$1" "$TLS_PORT" https
}

stop_edge() {  # NAME: SIGTERM, and wait for it to exit (the counts are written at exit)
  local pid=${ROOT_PID[$1]} i
  kill -TERM "$pid"
  for i in $(seq 300); do alive "$pid" || break; sleep 0.1; done
  alive "$pid" && die "$1 did not exit within 30 s of SIGTERM"
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

phase() {  # WHAT DURATION ARGS...: one wrk run (its summary line is printed)
  local what=$1 duration=$2; shift 2
  local rps
  rps=$(wrk -t1 -c"$CONNS" -d"$duration" "$@" 2>&1 | awk '/^Requests\/sec/ {print $2}')
  [[ -n $rps ]] || die "wrk failed in the training phase '$what'"
  printf '   %-34s %s req/s\n' "$what" "$rps"
}

head -c 1024 /dev/zero | tr '\0' x >"$WORK/post-body"
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = io.open("$WORK/post-body"):read("*a")
wrk.headers["Content-Type"] = "application/octet-stream"
EOF

note "training: the plain proxy"
run_edge plain
P=http://127.0.0.1:$PLAIN_PORT T=https://127.0.0.1:$TLS_PORT
phase "GET, keep-alive" "$TRAIN" "$P/"
phase "POST 1 KiB, keep-alive" "$TRAIN_SHORT" -s "$WORK/post.lua" "$P/"
phase "GET, a connection per request" "$TRAIN_SHORT" -H "Connection: close" "$P/"
phase "GET over TLS, keep-alive" "$TRAIN_SHORT" "$T/"
if command -v h2load >/dev/null; then
  rps=$(h2load -c"$CONNS" -m1 -D"${TRAIN_SHORT%s}" "$T/" 2>&1 | awk '/^finished in/ {print $4}')
  printf '   %-34s %s req/s\n' "GET over HTTP/2" "${rps:-?}"
else
  echo "   (no h2load: HTTP/2 not trained)"
fi
stop_edge plain

note "training: cache, WAF, rate limit, explanation headers"
run_edge features
F=(-H "Host: $FEATURES_HOST")
phase "GET, cached" "$TRAIN_SHORT" "${F[@]}" "$P/cached/page"
phase "GET, rate-limited route" "$TRAIN_SHORT" "${F[@]}" "$P/limited/"
phase "GET, WAF rules evaluated" "$TRAIN_SHORT" "${F[@]}" "$P/?q=select"
phase "GET, blocked by the WAF" "$TRAIN_SHORT" "${F[@]}" -H "User-Agent: sqlmap/1.0" "$P/"
stop_edge features

shopt -s nullglob
raw=("$PROFILES"/rampart-*.profraw)
(( ${#raw[@]} > 0 )) || die "the instrumented edge wrote no profile into $PROFILES"
"$PROFDATA" merge -o "$WORK/rampart.profdata" "${raw[@]}"

# --- 3. The optimised build --------------------------------------------------------
# The profile's name carries its hash: cargo rebuilds when the flags change, not when a
# file they name does.
mkdir -p "$OUT_TARGET"
sum=$(sha256sum "$WORK/rampart.profdata" | cut -c1-12)
PROFILE=$OUT_TARGET/rampart-$sum.profdata
cp "$WORK/rampart.profdata" "$PROFILE"
note "optimised build ($OUT_TARGET, profile $(basename "$PROFILE"))"
(cd "$REPO_DIR" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE" \
  cargo build --release --locked -p rampart --target-dir "$OUT_TARGET")
"$OUT_TARGET/release/rampart" --version >/dev/null || die "the optimised build does not run"
# What it was built from, for bench/run.sh to show (and warn when the checkout moved on).
git -C "$REPO_DIR" describe --always --dirty 2>/dev/null >"$OUT_TARGET/built-from" || echo unknown >"$OUT_TARGET/built-from"
note "built $OUT_TARGET/release/rampart (bench/run.sh measures it beside the plain build as rampart-pgo)"
