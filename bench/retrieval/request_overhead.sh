#!/usr/bin/env bash
# bench/retrieval/request_overhead.sh — what one local retrieval adds to a prompt request
# under load (target: <= 2 ms p50). On loopback: a fixed nginx upstream (127.0.0.1:19001,
# the same fixed chat completion as bench/load.sh) behind promptgate (127.0.0.1:19003),
# with prompts whose messages are the same:
#   plain     no retrieval
#   kb        one hook `{retriever: kb, query: "{{ question }}", top_k: 4,
#             max_tokens: 1500, into: passages}`, the template listing the passages;
#             `kb` is a lexical `local` retriever over the evaluation corpus
#             bench/retrieval/data/policies/corpus.jsonl (221 passages), ingested with
#             `promptgate ingest`, result cache OFF (`cache: {ttl: 0s}`): every request
#             really searches
#   kbcached  the same with the default result cache (ttl 5m): after the first pass over
#             the questions every search is a cache hit
#   kb10k     as kb, over the deterministic synthetic 10,000-passage corpus of
#             `retrieval_eval gen-scale` (BENCH_SCALE=0 skips it)
# Each prompt endpoint (POST /v1/prompts/{id}/chat/completions) is driven by oha at a
# fixed rate with latency correction; `oha -Z FILE` gives each request one line of FILE,
# drawn at random (oha 1.16), so the requests spread evenly over the 66 real questions
# (zh + en) of queries.jsonl, the same mix for every prompt (~30 requests per question
# and run at the defaults). The
# prompts run in interleaved rounds (plain, kb, … then the reverse order, and so on) to
# cancel machine drift; p50/p99 are over all rounds of a prompt pooled. Helper:
# bench/retrieval/request_overhead.py (configs, smoke check, table).
#
# Environment knobs (all optional):
#   BENCH_SKIP_BUILD=1     do not run `cargo build --release` (nor build retrieval_eval)
#   PROMPTGATE_BIN=path    binary to run (default target/release/promptgate)
#   BENCH_IDLE_WAIT=sec    max wait for an idle machine (no rustc/cargo, <15% CPU for 10 s; default 300)
#   BENCH_RATE, BENCH_DURATION, BENCH_CONNS, BENCH_ROUNDS   (200 req/s, 10 s, 4, 4)
#   BENCH_SCALE=n          passages of the synthetic corpus (default 10000; 0 skips kb10k)
#   BENCH_OUT=dir          results folder (default bench/out)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BENCH=$ROOT/bench
OUT=${BENCH_OUT:-$BENCH/out}
TOOLS=$BENCH/.tools
PG_BIN=${PROMPTGATE_BIN:-$ROOT/target/release/promptgate}
EVAL_BIN=$ROOT/target/release/examples/retrieval_eval
DATA=$HERE/data/policies
RATE=${BENCH_RATE:-200}
DURATION=${BENCH_DURATION:-10}
CONNS=${BENCH_CONNS:-4}
ROUNDS=${BENCH_ROUNDS:-4}
SCALE=${BENCH_SCALE:-10000}
IDLE_WAIT=${BENCH_IDLE_WAIT:-300}
PORTS=(19001 19003)

say() { printf '[request_overhead.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ tools, build
# shellcheck source=../lib.sh
source "$BENCH/lib.sh"
KEEP_LOGS=(promptgate.log:overhead-promptgate.log nginx-upstream/logs/error.log:overhead-nginx-upstream-error.log)
bench_traps
bench_tools
bench_build
if (( SCALE > 0 )) && [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  say "cargo build --release --example retrieval_eval (for gen-scale)"
  (cd "$ROOT" && cargo build --release --quiet --example retrieval_eval) || die "build of retrieval_eval failed"
fi
if (( SCALE > 0 )) && [[ ! -x "$EVAL_BIN" ]]; then
  die "no $EVAL_BIN for the ${SCALE}-passage corpus (build it, or BENCH_SCALE=0)"
fi

bench_ports_free "${PORTS[@]}"

# ------------------------------------------------------------------ configs, ingest
TMP=$(mktemp -d /tmp/promptgate-overhead.XXXXXX)
python3 "$BENCH/bench.py" gen --dir "$TMP" >/dev/null   # its nginx upstream (the proxy is unused)
scale_args=()
if (( SCALE > 0 )); then
  say "generating the ${SCALE}-passage synthetic corpus (retrieval_eval gen-scale)"
  "$EVAL_BIN" gen-scale "$TMP/scale" --from "$DATA" --passages "$SCALE" >&2
  scale_args=(--scale-corpus "$TMP/scale/corpus.jsonl")
fi
read -r -a RETRIEVERS <<<"$(python3 "$HERE/request_overhead.py" gen --dir "$TMP" \
  --corpus "$DATA/corpus.jsonl" --queries "$DATA/queries.jsonl" "${scale_args[@]}")"
rm -rf "$TMP/scale"
CFG=$TMP/promptgate/promptgate.yaml
QUESTIONS=$(wc -l <"$TMP/bodies.jsonl")

for r in "${RETRIEVERS[@]}"; do
  say "promptgate ingest $r"
  "$PG_BIN" ingest "$r" "$TMP/promptgate/corpus/$r" --config "$CFG" 2>&1 | tail -2 >&2 \
    || die "ingest $r failed"
done
"$PG_BIN" check --config "$CFG" >&2 || die "promptgate check failed"

# ------------------------------------------------------------------ start
bench_wait_idle
"$NGINX" -t -q -c "$TMP/nginx-upstream/nginx.conf" -p "$TMP/nginx-upstream" \
  || die "nginx (upstream) config test failed"
"$NGINX" -c "$TMP/nginx-upstream/nginx.conf" -p "$TMP/nginx-upstream" &
NGX_UP=$!; PIDS+=("$NGX_UP")
wait_port 19001 "$NGX_UP" "nginx upstream"
# Logging at warn: the per-request info lines would be part of what is measured in
# both prompts alike, but they cost the 2 cores the load generator shares.
PROMPTGATE_LOG=${PROMPTGATE_LOG:-warn} "$PG_BIN" serve --config "$CFG" --listen 127.0.0.1:19003 \
  2>"$TMP/promptgate.log" &
PG=$!; PIDS+=("$PG")
wait_port 19003 "$PG" "promptgate"
say "started: nginx upstream pid $NGX_UP, promptgate pid $PG"

PROMPTS=(plain "${RETRIEVERS[@]}")
python3 "$HERE/request_overhead.py" check --dir "$TMP" --prompts "$(IFS=,; echo "${PROMPTS[*]}")" >&2 \
  || die "smoke check failed"

# ------------------------------------------------------------------ measure
oha_run() {  # prompt seconds csv-out
  "$OHA" --no-tui --output-format csv -q "$RATE" --latency-correction -z "${2}s" -c "$CONNS" \
    -m POST -H 'content-type: application/json' -Z "$TMP/bodies.jsonl" \
    "http://127.0.0.1:19003/v1/prompts/$1/chat/completions" >"$3" 2>"$3.err" &
  local pid=$!; PIDS=("$pid" "${PIDS[@]}")
  wait "$pid" || die "oha failed on $1: $(head -c 300 "$3.err")"
  PIDS=("${PIDS[@]:1}")
}
mkdir -p "$TMP/runs" "$TMP/warm"
say "warm-up: 2 s per prompt"
for p in "${PROMPTS[@]}"; do oha_run "$p" 2 "$TMP/warm/$p.csv"; done
order=()
for ((r = 1; r <= ROUNDS; r++)); do
  if (( r % 2 )); then seq_=("${PROMPTS[@]}"); else
    seq_=(); for ((i = ${#PROMPTS[@]} - 1; i >= 0; i--)); do seq_+=("${PROMPTS[$i]}"); done
  fi
  order+=("$(IFS=,; echo "${seq_[*]}")")
  for p in "${seq_[@]}"; do
    say "round $r/$ROUNDS: $p (${RATE} req/s, ${DURATION} s, ${CONNS} connections)"
    oha_run "$p" "$DURATION" "$TMP/runs/$p-$r.csv"
  done
done
kill -0 "$PG" 2>/dev/null || die "promptgate died during the run"

dirty=$(git -C "$ROOT" --no-optional-locks status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null || true)
PG_VER="$("$PG_BIN" --version 2>/dev/null | head -1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')${dirty:+ +uncommitted changes in src})"
python3 "$HERE/request_overhead.py" report --dir "$TMP" --out "$OUT" \
  --rate "$RATE" --duration "$DURATION" --conns "$CONNS" --rounds "$ROUNDS" \
  --questions "$QUESTIONS" --order "$(printf '%s; ' "${order[@]}" | sed 's/; $//')" --idle "$IDLE" \
  --pg-version "$PG_VER" --oha-version "$("$OHA" --version | head -1)"

if sed 's/\x1b\[[0-9;]*m//g' "$TMP/promptgate.log" | grep -E ' (WARN|ERROR) ' | grep -vq 'no admin key set'; then
  say "promptgate logged warnings/errors:"
  sed 's/\x1b\[[0-9;]*m//g' "$TMP/promptgate.log" | grep -E ' (WARN|ERROR) ' | grep -v 'no admin key set' | head -5 >&2
fi
say "rerun: bench/retrieval/request_overhead.sh   (results: $OUT/overhead-latest.md, .json)"
