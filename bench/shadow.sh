#!/usr/bin/env bash
# bench/shadow.sh — what shadow traffic costs the client's request, on loopback.
#   One promptgate on 127.0.0.1:19003 in front of the fixed nginx upstream
#   (127.0.0.1:19001) with the routes `plain` (no shadow), `shadowed` (every request
#   copied to the provider `candidate`: the same nginx under another provider id;
#   `sample: 1.0`, `max_in_flight: 256`) and `shadowed-kept` (the same with
#   `keep_outputs: true`); the pairs go to a SQLite store in the scratch folder.
#   1. rounds of fixed-rate windows (oha, latency correction), the cases alternating:
#      the gateway's own time per route (`promptgate_gateway_overhead_seconds`
#      deltas), client latency, promptgate CPU per request, candidate calls/drops
#   2. the `x-promptgate-overhead-us` header of sequential requests, cases interleaved
#   3. the pairs in the store file once the gateway has stopped
#   The cases `plain-anthropic` and `shadowed-anthropic` ask the same routes in the
#   Anthropic dialect (the canonical path), the OpenAI cases take the fast path.
# See BENCHMARKS.md, section "Shadow traffic". Helpers: bench/shadow_bench.py (which
# reuses bench/bench.py and bench/cache_bench.py).
#
# Environment knobs (all optional):
#   BENCH_SKIP_BUILD=1     do not run `cargo build --release`
#   PROMPTGATE_BIN=path    binary to run (default target/release/promptgate)
#   BENCH_IDLE_WAIT=sec    max wait for an idle machine: no rustc/cargo, <15% CPU for 10 s (default 600)
#   BENCH_RATE, BENCH_DURATION, BENCH_ROUNDS   (1000, 10, 3)
#   BENCH_OVERHEAD_N=n     sequential requests per case for the header figures (default 2000)
#   BENCH_CASES=a,b,...    cases (default plain,shadowed,kept,plain-anthropic,shadowed-anthropic)
#   BENCH_OUT=dir          results folder (default bench/out)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${BENCH_OUT:-$BENCH/out}
TOOLS=$BENCH/.tools
PG_BIN=${PROMPTGATE_BIN:-$ROOT/target/release/promptgate}
RATE=${BENCH_RATE:-1000}
DURATION=${BENCH_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-3}
OVERHEAD_N=${BENCH_OVERHEAD_N:-2000}
CASES=${BENCH_CASES:-plain,shadowed,kept,plain-anthropic,shadowed-anthropic}
IDLE_WAIT=${BENCH_IDLE_WAIT:-600}

say() { printf '[shadow.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
KEEP_LOGS=("promptgate.log:shadow-promptgate.log" "nginx-upstream/logs/error.log:shadow-nginx-upstream-error.log")
bench_traps
bench_tools
bench_build
bench_ports_free 19001 19003
bench_wait_idle

T0=$(date +%s)
TMP=$(mktemp -d /tmp/promptgate-shadowbench.XXXXXX)
python3 "$BENCH/shadow_bench.py" gen --dir "$TMP" >/dev/null
STORE=$TMP/pg/shadow.sqlite

py_step() { bench_py_step "$BENCH/shadow_bench.py" "$@"; }  # timeout-seconds what args...

"$NGINX" -t -q -c "$TMP/nginx-upstream/nginx.conf" -p "$TMP/nginx-upstream" \
  || die "nginx (upstream) config test failed"
"$NGINX" -c "$TMP/nginx-upstream/nginx.conf" -p "$TMP/nginx-upstream" &
NGX_UP=$!; PIDS+=("$NGX_UP")
wait_port 19001 "$NGX_UP" "nginx upstream"
"$PG_BIN" check --config "$TMP/pg/promptgate.yaml" >&2 || die "promptgate check failed"
"$PG_BIN" serve --config "$TMP/pg/promptgate.yaml" --listen 127.0.0.1:19003 2>"$TMP/promptgate.log" &
PG=$!; PIDS+=("$PG")
wait_port 19003 "$PG" "promptgate"
say "started: nginx upstream pid $NGX_UP, promptgate pid $PG"

py_step 20 "smoke check" check --dir "$TMP" --cases "$CASES" >&2

# (--no-optional-locks: read-only, and a status compares contents, not just mtimes)
dirty=$(git -C "$ROOT" --no-optional-locks status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null || true)
PG_VER="$("$PG_BIN" --version 2>/dev/null | head -1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')${dirty:+ +uncommitted changes in src})"
ncases=$(awk -F, '{print NF}' <<<"$CASES")
# budget: per window warm-up + duration + scrapes, a re-measure of disturbed windows,
# and the sequential phase
budget=$(( ROUNDS * ncases * (DURATION + 4) + 120 + OVERHEAD_N * ncases / 500 ))
say "measuring: $ROUNDS rounds x $ncases cases x ${DURATION}s at $RATE req/s, then $OVERHEAD_N sequential requests per case (at most ${budget}s)"
py_step "$budget" "measurement" run --dir "$TMP" --oha "$OHA" --pg-pid "$PG" \
  --nginx-upstream-pid "$NGX_UP" --store "$STORE" --cases "$CASES" \
  --rate "$RATE" --duration "$DURATION" --rounds "$ROUNDS" --overhead-n "$OVERHEAD_N" --idle "$IDLE" \
  --oha-version "$("$OHA" --version | head -1)" \
  --nginx-version "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')" \
  --pg-version "$PG_VER"
kill -0 "$PG" 2>/dev/null || die "promptgate died during the run"

# The gateway's shutdown writes out what the store's queue still holds.
drop_pid "$PG"
kill -TERM "$PG" 2>/dev/null || true
for _ in $(seq 150); do kill -0 "$PG" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PG" 2>/dev/null && { say "promptgate did not stop within 15 s"; kill -KILL "$PG" 2>/dev/null || true; }
wait "$PG" 2>/dev/null || true
py_step 20 "store count" store --dir "$TMP" --store "$STORE"

python3 "$BENCH/shadow_bench.py" report --dir "$TMP" --out "$OUT"
say "measurement took $(( $(date +%s) - T0 )) s"

# (the gateway colours its log even into a file: strip ANSI escapes first; the
# start-up warning about the unset admin key is expected here)
if sed 's/\x1b\[[0-9;]*m//g' "$TMP/promptgate.log" | grep -E ' (WARN|ERROR) ' | grep -vq 'no admin key set'; then
  say "promptgate logged warnings/errors:"
  sed 's/\x1b\[[0-9;]*m//g' "$TMP/promptgate.log" | grep -E ' (WARN|ERROR) ' | grep -v 'no admin key set' | head -5 >&2
fi
say "results: $OUT/shadow-latest.md, $OUT/shadow-latest.json"
