#!/usr/bin/env bash
# bench/load.sh — side-by-side load benchmark on loopback:
#   (a) direct to a fixed nginx upstream   127.0.0.1:19001
#   (b) through nginx proxy_pass           127.0.0.1:19002
#   (c) through promptgate                 127.0.0.1:19003
# See BENCHMARKS.md for what is measured and why.
#
# Environment knobs (all optional):
#   BENCH_SKIP_BUILD=1     do not run `cargo build --release` (use the existing binary)
#   PROMPTGATE_BIN=path    binary to run (default target/release/promptgate)
#   BENCH_IDLE_WAIT=sec    max wait for an idle machine: no rustc/cargo, <15% CPU for 10 s (default 240)
#   BENCH_RATE, BENCH_DURATION, BENCH_TP_DURATION, BENCH_TTFB_N   (1000, 10, 10, 500)
#   BENCH_OUT=dir          results folder (default bench/out)
#   BENCH_H2=0             skip the HTTP/2 + TLS phase (bench.py run-h2: h1, h2c, TLS h1, TLS h2,
#                          nginx beside promptgate; results in latest-h2.md)
#   BENCH_H2_ONLY=1        run only that phase
#   BENCH_H2_CONNS=n       HTTP/2 connections the phase spreads its streams over (default 4)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${BENCH_OUT:-$BENCH/out}
TOOLS=$BENCH/.tools
PG_BIN=${PROMPTGATE_BIN:-$ROOT/target/release/promptgate}
RATE=${BENCH_RATE:-1000}
DURATION=${BENCH_DURATION:-10}
TP_DURATION=${BENCH_TP_DURATION:-10}
TTFB_N=${BENCH_TTFB_N:-500}
IDLE_WAIT=${BENCH_IDLE_WAIT:-240}
H2=${BENCH_H2:-1}
H2_ONLY=${BENCH_H2_ONLY:-0}
H2_CONNS=${BENCH_H2_CONNS:-4}
PORTS=(19001 19002 19003 19012 19022 19023 19033)

say() { printf '[load.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ tools, build, idle machine
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
KEEP_LOGS=(promptgate.log:promptgate.log promptgate-tls.log:promptgate-tls.log nginx-upstream/logs/error.log:nginx-upstream-error.log nginx-proxy/logs/error.log:nginx-proxy-error.log)
bench_traps
bench_tools
bench_build
bench_wait_idle

bench_ports_free "${PORTS[@]}"

# ------------------------------------------------------------------ configs + start
TMP=$(mktemp -d /tmp/promptgate-bench.XXXXXX)
python3 "$BENCH/bench.py" gen --dir "$TMP" >/dev/null

for inst in upstream proxy; do
  "$NGINX" -t -q -c "$TMP/nginx-$inst/nginx.conf" -p "$TMP/nginx-$inst" \
    || die "nginx ($inst) config test failed"
done
"$NGINX" -c "$TMP/nginx-upstream/nginx.conf" -p "$TMP/nginx-upstream" &
NGX_UP=$!; PIDS+=("$NGX_UP")
wait_port 19001 "$NGX_UP" "nginx upstream"
"$NGINX" -c "$TMP/nginx-proxy/nginx.conf" -p "$TMP/nginx-proxy" &
NGX_PX=$!; PIDS+=("$NGX_PX")
wait_port 19002 "$NGX_PX" "nginx proxy"

"$PG_BIN" check --config "$TMP/promptgate/promptgate.yaml" >&2 || die "promptgate check failed"
"$PG_BIN" serve --config "$TMP/promptgate/promptgate.yaml" --listen 127.0.0.1:19003 \
  2>"$TMP/promptgate.log" &
PG=$!; PIDS+=("$PG")
wait_port 19003 "$PG" "promptgate"
say "started: nginx upstream pid $NGX_UP, nginx proxy pid $NGX_PX, promptgate pid $PG"
if [[ "$H2" == 1 ]]; then
  # The same gateway over TLS (the certificate nginx's TLS listener serves).
  "$PG_BIN" serve --config "$TMP/promptgate-tls/promptgate.yaml" 2>"$TMP/promptgate-tls.log" &
  PG_TLS=$!; PIDS+=("$PG_TLS")
  wait_port 19023 "$PG_TLS" "promptgate (TLS)"
  wait_port 19022 "$NGX_PX" "nginx proxy (TLS)"
  say "started: promptgate (TLS) pid $PG_TLS"
fi

python3 "$BENCH/bench.py" check --dir "$TMP" >&2 || die "smoke check failed (a target answered wrongly)"

# ------------------------------------------------------------------ measure
PG_VER="$("$PG_BIN" --version 2>/dev/null | head -1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '+uncommitted'))"
# In the background + wait, so Ctrl-C/TERM reach the trap at once (timeout runs its
# child in its own process group); cleanup then stops it like the servers.
if [[ "$H2_ONLY" != 1 ]]; then
timeout 360 python3 "$BENCH/bench.py" run --dir "$TMP" --out "$OUT" \
  --oha "$OHA" --wrk "$WRK" \
  --pg-pid "$PG" --nginx-proxy-pid "$NGX_PX" --nginx-upstream-pid "$NGX_UP" \
  --rate "$RATE" --duration "$DURATION" --tp-duration "$TP_DURATION" --ttfb-n "$TTFB_N" \
  --idle "$IDLE" \
  --oha-version "$("$OHA" --version | head -1)" \
  --wrk-version "$("$WRK" -v 2>&1 | head -1 | cut -d' ' -f1-2)" \
  --nginx-version "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')" \
  --pg-version "$PG_VER" &
RUN=$!; PIDS=("$RUN" "${PIDS[@]}")
wait "$RUN" || die "measurement failed"
PIDS=("${PIDS[@]:1}")
fi

if [[ "$H2" == 1 ]]; then
  timeout 600 python3 "$BENCH/bench.py" run-h2 --dir "$TMP" --out "$OUT" --oha "$OHA" \
    --pg-pid "$PG" --pg-tls-pid "$PG_TLS" --nginx-proxy-pid "$NGX_PX" --nginx-upstream-pid "$NGX_UP" \
    --rate "$RATE" --duration "$DURATION" --tp-duration "$TP_DURATION" --h2-conns "$H2_CONNS" \
    --oha-version "$("$OHA" --version | head -1)" \
    --nginx-version "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')" \
    --pg-version "$PG_VER" &
  RUN=$!; PIDS=("$RUN" "${PIDS[@]}")
  wait "$RUN" || die "HTTP/2 + TLS measurement failed"
  PIDS=("${PIDS[@]:1}")
  kill -0 "$PG_TLS" 2>/dev/null || die "promptgate (TLS) died during the run"
fi

kill -0 "$PG" 2>/dev/null || die "promptgate died during the run"
# (the gateway colours its log even into a file: strip ANSI escapes first)
if sed 's/\x1b\[[0-9;]*m//g' "$TMP/promptgate.log" | grep -Eq ' (WARN|ERROR) '; then
  say "promptgate logged warnings/errors during the run:"
  sed 's/\x1b\[[0-9;]*m//g' "$TMP/promptgate.log" | grep -E ' (WARN|ERROR) ' | head -5 >&2
fi
say "results: $OUT/latest.md, $OUT/latest.json$([[ "$H2" == 1 ]] && echo ", $OUT/latest-h2.md")"
