#!/usr/bin/env bash
# bench/cache_hit.sh — response-cache benchmark on loopback:
#   a cache hit end to end through promptgate vs the direct loopback round trip
#   to the fixed nginx upstream (127.0.0.1:19001); promptgate on 127.0.0.1:19003
#   with the routes `cached` (cache: {mode: on}) and `uncached`, same upstream.
#   1. latency at a fixed 1,000 req/s (oha, latency correction): direct, hits, uncached
#   2. max requests/s at 64 connections (wrk): direct, hits, uncached
#   3. memory bound: a fresh promptgate with cache max_bytes 4 MiB, 30,000 distinct
#      requests; cache gauges and RSS afterwards
# See BENCHMARKS.md, section "Response cache". Helpers: bench/cache_bench.py (which
# reuses bench/bench.py for the upstream config, the HTTP client and oha/wrk runs).
#
# Environment knobs (all optional):
#   BENCH_SKIP_BUILD=1     do not run `cargo build --release`
#   PROMPTGATE_BIN=path    binary to run (default target/release/promptgate)
#   BENCH_IDLE_WAIT=sec    max wait for an idle machine: no rustc/cargo, <15% CPU for 10 s (default 600)
#   BENCH_RATE, BENCH_DURATION, BENCH_TP_DURATION   (1000, 10, 10)
#   BENCH_MEM_BOUND=bytes  cache bound of the memory phase (default 4194304)
#   BENCH_MEM_N=n          distinct requests of the memory phase (default 30000)
#   BENCH_OUT=dir          results folder (default bench/out)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${BENCH_OUT:-$BENCH/out}
TOOLS=$BENCH/.tools
PG_BIN=${PROMPTGATE_BIN:-$ROOT/target/release/promptgate}
RATE=${BENCH_RATE:-1000}
DURATION=${BENCH_DURATION:-10}
TP_DURATION=${BENCH_TP_DURATION:-10}
IDLE_WAIT=${BENCH_IDLE_WAIT:-600}
MEM_BOUND=${BENCH_MEM_BOUND:-4194304}
MEM_N=${BENCH_MEM_N:-30000}
PORTS=(19001 19003)

say() { printf '[cache_hit.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ cleanup
PIDS=()
TMP=""
stop_pid() {  # TERM, up to 5 s, then KILL
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [[ -n "$TMP" && -d "$TMP" ]]; then
    mkdir -p "$OUT/logs"
    cp -f "$TMP/promptgate-lat.log" "$OUT/logs/cache-promptgate-lat.log" 2>/dev/null || true
    cp -f "$TMP/promptgate-mem.log" "$OUT/logs/cache-promptgate-mem.log" 2>/dev/null || true
    cp -f "$TMP/nginx-upstream/logs/error.log" "$OUT/logs/cache-nginx-upstream-error.log" 2>/dev/null || true
    rm -rf "$TMP"
  fi
  [[ $rc -eq 0 ]] || say "failed (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ tools, build, idle machine
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_tools
bench_build
bench_wait_idle

T0=$(date +%s)

for p in "${PORTS[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is already in use"; fi
done

# ------------------------------------------------------------------ configs + start
TMP=$(mktemp -d /tmp/promptgate-cachebench.XXXXXX)
python3 "$BENCH/cache_bench.py" gen --dir "$TMP" --mem-bound "$MEM_BOUND" >/dev/null

wait_port_free() {  # port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || return 0
    sleep 0.1
  done
  die "port $1 still in use after 10s"
}
start_pg() {  # config-dir log  -> sets PG
  "$PG_BIN" check --config "$TMP/$1/promptgate.yaml" >&2 || die "promptgate check failed ($1)"
  "$PG_BIN" serve --config "$TMP/$1/promptgate.yaml" --listen 127.0.0.1:19003 2>"$TMP/$2" &
  PG=$!; PIDS+=("$PG")
  wait_port 19003 "$PG" "promptgate"
}
py_step() { bench_py_step "$BENCH/cache_bench.py" "$@"; }  # timeout-seconds what args...

"$NGINX" -t -q -c "$TMP/nginx-upstream/nginx.conf" -p "$TMP/nginx-upstream" \
  || die "nginx (upstream) config test failed"
"$NGINX" -c "$TMP/nginx-upstream/nginx.conf" -p "$TMP/nginx-upstream" &
NGX_UP=$!; PIDS+=("$NGX_UP")
wait_port 19001 "$NGX_UP" "nginx upstream"
start_pg pg-lat promptgate-lat.log
say "started: nginx upstream pid $NGX_UP, promptgate pid $PG (cache max_bytes 64 MiB)"

# One request warms the entry, the next must be a hit.
py_step 20 "smoke check (miss then hit)" check --dir "$TMP" >&2

# ------------------------------------------------------------------ measure
# (--no-optional-locks: read-only, and a status compares contents, not just mtimes)
dirty=$(git -C "$ROOT" --no-optional-locks status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null || true)
PG_VER="$("$PG_BIN" --version 2>/dev/null | head -1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')${dirty:+ +uncommitted changes in src})"
# Time budget of the measurement (< 3 min in all): run <= 140 s (re-measuring of
# disturbed windows stops after 40 s), memory <= 30 s, restarts and checks ~5 s.
py_step 140 "latency/throughput phase" run --dir "$TMP" \
  --oha "$OHA" --wrk "$WRK" --pg-pid "$PG" --nginx-upstream-pid "$NGX_UP" \
  --rate "$RATE" --duration "$DURATION" --tp-duration "$TP_DURATION" --idle "$IDLE" \
  --oha-version "$("$OHA" --version | head -1)" \
  --wrk-version "$("$WRK" -v 2>&1 | head -1 | cut -d' ' -f1-2)" \
  --nginx-version "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')" \
  --pg-version "$PG_VER"
kill -0 "$PG" 2>/dev/null || die "promptgate died during the run"

# Memory bound: a fresh gateway with a small cache.
drop_pid "$PG"; stop_pid "$PG"
wait_port_free 19003
start_pg pg-mem promptgate-mem.log
say "restarted promptgate pid $PG with cache max_bytes $MEM_BOUND"
py_step 30 "memory phase" memory --dir "$TMP" --pg-pid "$PG" --bound "$MEM_BOUND" --n "$MEM_N"
kill -0 "$PG" 2>/dev/null || die "promptgate died during the memory phase"

python3 "$BENCH/cache_bench.py" report --dir "$TMP" --out "$OUT"
say "measurement took $(( $(date +%s) - T0 )) s"

# (the gateway colours its log even into a file: strip ANSI escapes first; the
# start-up warning about the unset admin key is expected here)
for log in promptgate-lat.log promptgate-mem.log; do
  if sed 's/\x1b\[[0-9;]*m//g' "$TMP/$log" | grep -E ' (WARN|ERROR) ' | grep -vq 'no admin key set'; then
    say "promptgate logged warnings/errors ($log):"
    sed 's/\x1b\[[0-9;]*m//g' "$TMP/$log" | grep -E ' (WARN|ERROR) ' | grep -v 'no admin key set' | head -5 >&2
  fi
done
say "results: $OUT/cache-latest.md, $OUT/cache-latest.json"
