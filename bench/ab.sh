#!/usr/bin/env bash
# bench/ab.sh OLD_BINARY NEW_BINARY [PAIRS] — saturation A/B of two promptgate
# builds on this machine: the same nginx upstream and gateway config as
# bench/load.sh, then for each pair `wrk -t1 -c64` for 8 s against each binary in
# turn (2 s warm-up each), printing requests/s and the gateway's CPU time per
# request (user+system from /proc). Alternating in pairs is what makes the two
# comparable on a machine whose speed drifts over minutes; read the medians.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
TOOLS=$BENCH/.tools
OLD=${1:?usage: bench/ab.sh OLD_BINARY NEW_BINARY [PAIRS]}
NEW=${2:?usage: bench/ab.sh OLD_BINARY NEW_BINARY [PAIRS]}
PAIRS=${3:-6}
PG_BIN=$NEW
IDLE_WAIT=${BENCH_IDLE_WAIT:-240}

say() { printf '[ab.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
command -v nginx >/dev/null || apt_install nginx
command -v wrk >/dev/null || apt_install wrk
bench_wait_idle

TMP=$(mktemp -d /tmp/promptgate-ab.XXXXXX)
NGX=""
PG=""
cleanup() {
  [[ -n "$PG" ]] && kill "$PG" 2>/dev/null || true
  [[ -n "$NGX" ]] && kill "$NGX" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
python3 "$BENCH/bench.py" gen --dir "$TMP" >/dev/null
nginx -c "$TMP/nginx-upstream/nginx.conf" -p "$TMP/nginx-upstream" &
NGX=$!
wait_port 19001 "$NGX" "nginx upstream"
export WRK_BODY_FILE=$TMP/body.json
URL=http://127.0.0.1:19003/v1/chat/completions

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

one() {  # label binary
  "$2" serve --config "$TMP/promptgate/promptgate.yaml" --listen 127.0.0.1:19003 2>"$TMP/pg.log" &
  PG=$!
  wait_port 19003 "$PG" "promptgate ($1)"
  wrk -t1 -c64 -d2s -s "$BENCH/wrk_post.lua" "$URL" >/dev/null
  local t0 t1 n hz
  hz=$(getconf CLK_TCK)
  t0=$(cpu_ticks "$PG")
  n=$(wrk -t1 -c64 -d8s -s "$BENCH/wrk_post.lua" "$URL" | sed -n 's/.*"requests":\([0-9]*\).*/\1/p')
  t1=$(cpu_ticks "$PG")
  printf '%-4s req/s %6d  cpu µs/req %4d\n' "$1" $((n / 8)) $(((t1 - t0) * 1000000 / hz / n))
  kill "$PG"
  wait "$PG" 2>/dev/null || true
  PG=""
}

for i in $(seq "$PAIRS"); do
  one old "$OLD"
  one new "$NEW"
done
