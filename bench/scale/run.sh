#!/usr/bin/env bash
# bench/scale/run.sh [streams|chunks|body|config|all]... — how the gateway's cost grows
# with the work, on loopback (see BENCHMARKS.md "Scale"):
#   streams  N concurrent slow `stream: true` requests through one replica (default as many
#            as the open-file hard limit allows, at most 10,000): RSS before / peak / after,
#            RSS per connection, errors, CPU
#   chunks   gateway CPU and own time per request for streams of 10 / 100 / 1,000 chunks
#   body     the same for request bodies of 1 KiB / 10 KiB / 100 KiB / 1 MiB
#   config   1,000 routes, 200 providers, 1,000 prompts x 5 versions: `check`, start until
#            ready, `POST /admin/reload`, a file change's reload; CPU per request at
#            saturation with that config against the small one (paired runs)
# Results: bench/out/scale-latest.{md,json} (each phase also in scale-phase-*.json).
#
# Environment knobs (all optional):
#   BENCH_SKIP_BUILD=1  PROMPTGATE_BIN=path  BENCH_IDLE_WAIT=sec  BENCH_OUT=dir  (as bench/load.sh)
#   SCALE_STREAMS=n           concurrent streams (default: min(10000, (hard fd limit - 200) / 2))
#   SCALE_STREAM_CHUNKS=20    chunks per slow stream      SCALE_STREAM_INTERVAL_MS=1000
#   SCALE_SECONDS=4           measuring time per size in the chunks and body phases
#   SCALE_PAIRS=3             paired saturation runs in the config phase
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH=$ROOT/bench
HERE=$BENCH/scale
OUT=${BENCH_OUT:-$BENCH/out}
TOOLS=$BENCH/.tools
PG_BIN=${PROMPTGATE_BIN:-$ROOT/target/release/promptgate}
IDLE_WAIT=${BENCH_IDLE_WAIT:-240}
CHUNKS=${SCALE_STREAM_CHUNKS:-20}
INTERVAL=${SCALE_STREAM_INTERVAL_MS:-1000}
SECONDS_PER=${SCALE_SECONDS:-4}
PAIRS=${SCALE_PAIRS:-3}
NGINX_PORT=19201 UP_PORT=19202 PG_PORT=19203 ADMIN_PORT=19204
PY=(python3 "$HERE/scale.py")

say() { printf '[scale %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

PHASES=("$@")
[[ ${#PHASES[@]} -gt 0 ]] || PHASES=(all)
for p in "${PHASES[@]}"; do
  case $p in streams|chunks|body|config) ;; all) PHASES=(streams chunks body config) ;;
    *) die "unknown phase '$p' (streams, chunks, body, config or all)" ;; esac
done

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
KEEP_LOGS=(promptgate.log:scale-promptgate.log upstream.log:scale-upstream.log)
bench_traps
command -v nginx >/dev/null || apt_install nginx
command -v wrk >/dev/null || apt_install wrk
command -v python3 >/dev/null || die "python3 is required"
bench_build
bench_wait_idle
bench_ports_free $NGINX_PORT $UP_PORT $PG_PORT $ADMIN_PORT

# Every process this script starts may use the whole open-file hard limit (the gateway needs
# two descriptors per stream: the client's connection and the upstream's).
ulimit -n "$(ulimit -Hn)"
HARD=$(ulimit -Hn)
MAX_STREAMS=$(( (HARD - 200) / 2 ))
(( MAX_STREAMS > 10000 )) && MAX_STREAMS=10000
STREAMS=${SCALE_STREAMS:-$MAX_STREAMS}
(( STREAMS <= MAX_STREAMS )) || die "SCALE_STREAMS=$STREAMS needs more than the open-file hard limit $HARD allows ($MAX_STREAMS)"

TMP=$(mktemp -d /tmp/promptgate-scale.XXXXXX)
mkdir -p "$OUT"
# Each run starts from no phase results: a phase not run is absent from the report.
rm -f "$OUT"/scale-phase-*.json

"${PY[@]}" upstream --port $UP_PORT 2>"$TMP/upstream.log" &
UP=$!; PIDS+=("$UP")
wait_port $UP_PORT "$UP" "upstream (scale.py)"
"${PY[@]}" gen-small --dir "$TMP/small" --port $PG_PORT --admin-port $ADMIN_PORT --upstream-port $UP_PORT \
  --max-connections $((STREAMS + 1000)) --slow-chunks "$CHUNKS" --slow-interval-ms "$INTERVAL" >/dev/null
# The config phase's small config: the same, with the `json` route on nginx (as the large one).
"${PY[@]}" gen-small --dir "$TMP/small-cfg" --port $PG_PORT --admin-port $ADMIN_PORT --upstream-port $UP_PORT \
  --json-url "http://127.0.0.1:$NGINX_PORT/json/v1" >/dev/null

# A phase's Python runs in the background and is waited for, so that Ctrl-C / TERM reach the
# trap at once and the clean-up stops it too (it then stops the gateways it started itself).
py_phase() {
  "${PY[@]}" "$@" &
  local p=$! rc=0
  PIDS=("$p" "${PIDS[@]}")
  wait "$p" || rc=$?
  PIDS=("${PIDS[@]:1}")
  return "$rc"
}

PG=""
start_gateway() {  # config dir
  SCALE_ADMIN_KEY=scale-admin-key RUST_LOG=warn "$PG_BIN" serve --config "$1/promptgate.yaml" \
    2>>"$TMP/promptgate.log" &
  PG=$!; PIDS+=("$PG")
  wait_port $PG_PORT "$PG" "promptgate"
}
stop_gateway() {
  kill -TERM "$PG" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$PG" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$PG" 2>/dev/null || true
  wait "$PG" 2>/dev/null || true
  PG=""
}

for phase in "${PHASES[@]}"; do
  case $phase in
    streams)
      start_gateway "$TMP/small"
      say "streams: $STREAMS concurrent streams of $CHUNKS chunks, one per ${INTERVAL} ms (open-file hard limit $HARD)"
      py_phase streams --port $PG_PORT --pg-pid "$PG" --upstream-pid "$UP" --out "$OUT" --n "$STREAMS" \
        || die "streams phase failed (errors or incomplete streams)"
      stop_gateway ;;
    chunks)
      start_gateway "$TMP/small"
      say "chunks: streams of 10, 100 and 1000 chunks, ${SECONDS_PER} s each"
      py_phase chunks --port $PG_PORT --pg-pid "$PG" --upstream-pid "$UP" --out "$OUT" --seconds "$SECONDS_PER" \
        || die "chunks phase failed"
      stop_gateway ;;
    body)
      start_gateway "$TMP/small"
      say "body: request bodies of 1 KiB .. 1 MiB, ${SECONDS_PER} s each"
      py_phase body --port $PG_PORT --pg-pid "$PG" --upstream-pid "$UP" --out "$OUT" --seconds "$SECONDS_PER" \
        || die "body phase failed"
      stop_gateway ;;
    config)
      "${PY[@]}" gen-large --dir "$TMP/large" --port $PG_PORT --admin-port $ADMIN_PORT \
        --upstream-url "http://127.0.0.1:$NGINX_PORT/json/v1" >/dev/null
      SHAPE="$(ls "$TMP/large/providers" | wc -l) providers, $(grep -c '^  [a-z0-9-]*:$' "$TMP/large/promptgate.yaml") routes, $(ls "$TMP/large/prompts" | wc -l) prompts x 5 versions, $(du -sh "$TMP/large" | cut -f1) of YAML"
      say "config: $SHAPE"
      # The upstream for the per-request comparison: nginx, so that it is not the bottleneck.
      mkdir -p "$TMP/nginx/logs" "$TMP/nginx/tmp"
      ANSWER=$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import scale; print(scale.JSON_ANSWER.decode())' "$HERE")
      cat > "$TMP/nginx/nginx.conf" <<NGX
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/tmp;
  proxy_temp_path $TMP/nginx/tmp;
  fastcgi_temp_path $TMP/nginx/tmp;
  uwsgi_temp_path $TMP/nginx/tmp;
  scgi_temp_path $TMP/nginx/tmp;
  keepalive_requests 10000000;
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    location = /json/v1/chat/completions { default_type application/json; return 200 '$ANSWER'; }
    location / { return 404; }
  }
}
NGX
      nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" &
      NGX=$!; PIDS+=("$NGX")
      wait_port $NGINX_PORT "$NGX" "nginx upstream"
      for label in small large; do
        dir=$TMP/$label; [[ $label == small ]] && dir=$TMP/small-cfg
        py_phase config --dir "$dir" --bin "$PG_BIN" --port $PG_PORT --admin-port $ADMIN_PORT \
          --label "$label" --touch-provider "$([[ $label == small ]] && echo up-json || echo p001)" \
          --log "$TMP/promptgate.log" --out "$OUT" --shape "$SHAPE" || die "config phase ($label) failed"
      done
      py_phase cost --tmp "$TMP" --bin "$PG_BIN" --small "$TMP/small-cfg" --large "$TMP/large" \
        --wrk "$(command -v wrk)" --lua "$BENCH/wrk_post.lua" --log "$TMP/promptgate.log" --out "$OUT" \
        --port $PG_PORT --pairs "$PAIRS" || die "config phase (per-request cost) failed" ;;
  esac
done

VER="$("$PG_BIN" --version 2>/dev/null | head -1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '+uncommitted')); idle wait: $IDLE; open-file hard limit $HARD"
"${PY[@]}" report --out "$OUT" --version "$VER" --slow-chunks "$CHUNKS" --slow-interval-ms "$INTERVAL" >/dev/null
if sed 's/\x1b\[[0-9;]*m//g' "$TMP/promptgate.log" | grep -Eq ' (WARN|ERROR) '; then
  say "promptgate logged warnings/errors:"
  sed 's/\x1b\[[0-9;]*m//g' "$TMP/promptgate.log" | grep -E ' (WARN|ERROR) ' | head -5 >&2
fi
say "results: $OUT/scale-latest.md, $OUT/scale-latest.json"
