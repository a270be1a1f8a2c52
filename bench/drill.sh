#!/usr/bin/env bash
# A switchover drill under load, on the release binary, offline: two sandbox
# providers behind one fallback route; `promptgate drill` takes the primary down
# for 10 s under 200 req/s (half streaming) and writes its report to bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
RPS="${RPS:-200}"
cargo build --release --quiet
dir="$(mktemp -d /tmp/promptgate-drill.XXXXXX)"
trap 'kill "${gw_pid:-}" 2>/dev/null || true; rm -rf "$dir"' EXIT
mkdir -p "$dir/providers" "$dir/prompts" bench/out
cat > "$dir/promptgate.yaml" <<'YAML'
listen: 127.0.0.1:19103
admin: {listen: 127.0.0.1:19104}
breaker: {cooldown: 2s}
routes:
  chat:
    first_token_timeout: 2s
    targets:
      - {provider: primary, model: echo}
      - {provider: secondary, model: echo}
YAML
for p in primary secondary; do
  printf 'kind: sandbox\nsandbox:\n  models:\n    echo: {chunk_chars: 4}\n' > "$dir/providers/$p.yaml"
done
export PROMPTGATE_ADMIN_KEY="drill-$$"
PROMPTGATE_LOG=warn target/release/promptgate serve --config "$dir/promptgate.yaml" 2>"$dir/gateway.log" &
gw_pid=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:19103/healthz >/dev/null && break; sleep 0.1; done
stamp="$(date +%Y%m%d-%H%M%S)"
target/release/promptgate drill --gateway http://127.0.0.1:19103 --admin http://127.0.0.1:19104 \
  --route chat --provider primary --fault down --warmup 3s --duration 10s --recovery 5s \
  --rps "$RPS" --out "bench/out/drill-$stamp"
cp "bench/out/drill-$stamp.md" bench/out/drill-latest.md
