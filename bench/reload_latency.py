#!/usr/bin/env python3
"""Hot-reload latency under load, on the release binary: while a steady stream of
requests runs through a prompt, the prompt file gets a new version promoted to
production; we time from the file save to the first response rendered from the
new version. Repeated 20 times; prints p50 / p90 / max. Offline (sandbox route).

Usage: bench/reload_latency.py [--rounds 20] [--workers 4]
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT, ADMIN = 19113, 19114


def prompt_file(latest):
    lines = ["variables:", "  name: {type: string}", "labels:", f"  production: {latest}", "versions:"]
    for n in range(1, latest + 1):
        lines += [f"  {n}:", "    route: echo", "    messages:", "      - role: user",
                  f"        content: \"v{n} {{{{ name }}}}\""]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    d = tempfile.mkdtemp(prefix="promptgate-reload.")
    os.makedirs(f"{d}/providers"), os.makedirs(f"{d}/prompts")
    open(f"{d}/promptgate.yaml", "w").write(
        f"listen: 127.0.0.1:{PORT}\nadmin: {{listen: 127.0.0.1:{ADMIN}}}\n"
        "routes:\n  echo:\n    provider: sandbox\n    model: echo\n")
    open(f"{d}/providers/sandbox.yaml", "w").write("kind: sandbox\nsandbox:\n  models:\n    echo: {}\n")
    path = f"{d}/prompts/p.yaml"
    open(path, "w").write(prompt_file(1))
    gw = subprocess.Popen([f"{ROOT}/target/release/promptgate", "serve", "--config", f"{d}/promptgate.yaml"],
                          stderr=subprocess.DEVNULL, env={**os.environ, "PROMPTGATE_LOG": "warn"})
    try:
        for _ in range(100):
            try:
                c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=1)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.05)
        seen = {}  # version -> first time seen
        lock = threading.Lock()
        stop = threading.Event()
        count = [0, 0]

        def worker():
            c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
            body = json.dumps({"variables": {"name": "x"}})
            while not stop.is_set():
                c.request("POST", "/v1/prompts/p/chat/completions", body, {"content-type": "application/json"})
                r = c.getresponse()
                r.read()
                now = time.monotonic()
                with lock:
                    count[0] += 1
                    if r.status != 200:
                        count[1] += 1
                    v = int(r.getheader("x-promptgate-prompt-version") or 0)
                    seen.setdefault(v, now)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
        for t in threads:
            t.start()
        time.sleep(1)
        latencies = []
        for latest in range(2, args.rounds + 2):
            saved = time.monotonic()
            tmp = path + ".tmp"
            open(tmp, "w").write(prompt_file(latest))
            os.replace(tmp, path)  # an editor's write-then-rename save
            while True:
                with lock:
                    t = seen.get(latest)
                if t is not None:
                    latencies.append(t - saved)
                    break
                if time.monotonic() - saved > 5:
                    latencies.append(float("inf"))
                    break
                time.sleep(0.005)
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=2)
        ms = sorted(x * 1000 for x in latencies)
        q = lambda p: ms[min(len(ms) - 1, int(round((len(ms) - 1) * p)))]
        print(f"requests during the run: {count[0]}, failed: {count[1]}")
        print(f"file saved -> new version served ({len(ms)} reloads, {args.workers} workers of steady load): "
              f"p50 {q(0.5):.0f} ms, p90 {q(0.9):.0f} ms, max {ms[-1]:.0f} ms")
    finally:
        gw.terminate()
        gw.wait()


if __name__ == "__main__":
    sys.exit(main())
