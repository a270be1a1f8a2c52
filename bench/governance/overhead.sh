#!/usr/bin/env bash
# bench/governance/overhead.sh — what auth, one rate limit and redaction add to the
# gateway's own time under load (target: <= +5 us p50). On loopback: the fixed nginx
# upstream of bench/load.sh (127.0.0.1:19001) behind two promptgate processes with the
# same route: `plain` (19003: no key, no limit, no data protection) and `governed`
# (19004: auth required with one key, a route rpm limit that never refuses, data:
# redact; the body carries a phone number and an e-mail address, redacted on every
# request). Each is driven by oha at a fixed rate in interleaved rounds (plain,
# governed, then the reverse, …) to cancel machine drift; the own time is the delta of
# `promptgate_gateway_overhead_seconds` around each run. Helper: overhead.py.
#
# Environment knobs (all optional):
#   BENCH_SKIP_BUILD=1     do not run `cargo build --release`
#   PROMPTGATE_BIN=path    binary to run (default target/release/promptgate)
#   BENCH_IDLE_WAIT=sec    max wait for an idle machine (default 300)
#   BENCH_RATE, BENCH_DURATION, BENCH_CONNS, BENCH_ROUNDS   (1000 req/s, 10 s, 8, 4)
#   BENCH_OUT=dir          results folder (default bench/out)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BENCH=$ROOT/bench
OUT=${BENCH_OUT:-$BENCH/out}
TOOLS=$BENCH/.tools
PG_BIN=${PROMPTGATE_BIN:-$ROOT/target/release/promptgate}
RATE=${BENCH_RATE:-1000}
DURATION=${BENCH_DURATION:-10}
CONNS=${BENCH_CONNS:-8}
ROUNDS=${BENCH_ROUNDS:-4}
IDLE_WAIT=${BENCH_IDLE_WAIT:-300}
PORTS=(19001 19003 19004)

say() { printf '[governance/overhead.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# shellcheck source=../lib.sh
source "$BENCH/lib.sh"
KEEP_LOGS=(plain.log:governance-plain.log governed.log:governance-governed.log)
bench_traps
bench_tools
bench_build

bench_ports_free "${PORTS[@]}"

TMP=$(mktemp -d /tmp/promptgate-governance.XXXXXX)
python3 "$BENCH/bench.py" gen --dir "$TMP" >/dev/null   # its nginx upstream
python3 "$HERE/overhead.py" gen --dir "$TMP" >/dev/null
KEY=$(cat "$TMP/key")
for n in plain governed; do
  "$PG_BIN" check --config "$TMP/$n/promptgate.yaml" >&2 || die "promptgate check ($n) failed"
done

bench_wait_idle
"$NGINX" -c "$TMP/nginx-upstream/nginx.conf" -p "$TMP/nginx-upstream" &
NGX_UP=$!; PIDS+=("$NGX_UP")
wait_port 19001 "$NGX_UP" "nginx upstream"
declare -A PORT=([plain]=19003 [governed]=19004)
for n in plain governed; do
  # Logging at warn: per-request info lines cost both alike but share the 2 cores.
  PROMPTGATE_LOG=${PROMPTGATE_LOG:-warn} "$PG_BIN" serve --config "$TMP/$n/promptgate.yaml" \
    2>"$TMP/$n.log" &
  pid=$!; PIDS+=("$pid")
  wait_port "${PORT[$n]}" "$pid" "promptgate ($n)"
done
python3 "$HERE/overhead.py" check --dir "$TMP" >&2 || die "smoke check failed"

oha_run() {  # name seconds csv-out
  local auth=()
  [[ $1 == governed ]] && auth=(-H "authorization: Bearer $KEY")
  "$OHA" --no-tui --output-format csv -q "$RATE" --latency-correction -z "${2}s" -c "$CONNS" \
    -m POST -H 'content-type: application/json' "${auth[@]}" -D "$TMP/body.json" \
    "http://127.0.0.1:${PORT[$1]}/v1/chat/completions" >"$3" 2>"$3.err" &
  local pid=$!; PIDS=("$pid" "${PIDS[@]}")
  wait "$pid" || die "oha failed on $1: $(head -c 300 "$3.err")"
  PIDS=("${PIDS[@]:1}")
}
mkdir -p "$TMP/runs"
say "warm-up: 2 s each"
for n in plain governed; do oha_run "$n" 2 "$TMP/runs/warm-$n.csv"; done
order=()
echo "[" >"$TMP/runs.json"; first=1
for ((r = 1; r <= ROUNDS; r++)); do
  if (( r % 2 )); then seq_=(plain governed); else seq_=(governed plain); fi
  order+=("$(IFS=,; echo "${seq_[*]}")")
  for n in "${seq_[@]}"; do
    say "round $r/$ROUNDS: $n (${RATE} req/s, ${DURATION} s, ${CONNS} connections)"
    before=$(python3 "$HERE/overhead.py" scrape --port "${PORT[$n]}")
    oha_run "$n" "$DURATION" "$TMP/runs/$n-$r.csv"
    after=$(python3 "$HERE/overhead.py" scrape --port "${PORT[$n]}")
    (( first )) || echo "," >>"$TMP/runs.json"; first=0
    printf '{"name":"%s","round":%d,"before":%s,"after":%s}\n' "$n" "$r" "$before" "$after" >>"$TMP/runs.json"
  done
done
echo "]" >>"$TMP/runs.json"

dirty=$(git -C "$ROOT" --no-optional-locks status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null || true)
PG_VER="$("$PG_BIN" --version 2>/dev/null | head -1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')${dirty:+ +uncommitted changes in src})"
python3 "$HERE/overhead.py" report --runs "$TMP/runs.json" --out "$OUT" \
  --rate "$RATE" --duration "$DURATION" --rounds "$ROUNDS" \
  --order "$(printf '%s; ' "${order[@]}" | sed 's/; $//')" --idle "$IDLE" --pg-version "$PG_VER"
say "rerun: bench/governance/overhead.sh   (results: $OUT/governance-latest.md, .json)"
