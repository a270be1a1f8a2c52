#!/usr/bin/env python3
"""Helpers for bench/scale/run.sh: how the gateway's cost grows with the work.

Subcommands (standard library only; everything on 127.0.0.1):
  upstream --port P        an OpenAI-compatible upstream on asyncio that holds many slow
                           streams cheaply. The mode is in the path the provider's base_url
                           points at:  /slow/<chunks>/<interval_ms>/v1/chat/completions,
                           /fast/<chunks>/v1/chat/completions, /json/v1/chat/completions
  gen-small --dir D ...    the gateway config for the streams / chunks / body phases
  gen-large --dir D ...    1,000 routes, 200 providers, 1,000 prompts x 5 versions
  streams ...              N concurrent slow `stream: true` requests; RSS, CPU, errors
  chunks ...               CPU and own time per request for streams of 10/100/1000 chunks
  body ...                 CPU and own time per request for 1 KB .. 1 MB request bodies
  config ...               check / start / reload timings and per-request cost, small vs large
  report --out D           merges the phases' JSON into scale-latest.{md,json}
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- /proc

def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmHWM", "VmRSS", "Threads"):
                out[k] = int(v.split()[0])
    return out


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def machine_state():
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    comp = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    c = f.read().strip()
            except OSError:
                continue
            if c in ("rustc", "cargo", "cc1", "ld", "build-script-build"):
                comp.add(c)
    return {"loadavg": " ".join(load), "compilers_running": sorted(comp)}


class Foreign:
    """Machine CPU used by processes other than the ones named, over a window, as a share
    of the whole machine (0 = quiet)."""

    def __init__(self, pids):
        self.pids = pids

    def sample(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        ours = 0.0
        for p in self.pids:
            try:
                ours += proc_cpu_s(p)
            except OSError:
                pass
        me = resource.getrusage(resource.RUSAGE_SELF)
        return (v[0] + v[1] + v[2]) / CLK_TCK, ours + me.ru_utime + me.ru_stime, sum(v[:8]) / CLK_TCK

    def fraction(self, before):
        m0, o0, t0 = before
        m1, o1, t1 = self.sample()
        return round(max(0.0, (m1 - m0) - (o1 - o0)) / max(1e-9, t1 - t0), 3)


class Instructions:
    """Instructions the process retires over a window (`perf stat`; None without perf).
    Unlike CPU time, the count hardly moves when other processes share the cores, so it
    is the figure to compare on a busy machine."""

    def __init__(self, pid):
        self.pid = pid
        self.p = None

    def __enter__(self):
        try:
            self.p = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "instructions", "-p", str(self.pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.1)  # attached before the window starts
        except OSError:
            self.p = None
        return self

    def __exit__(self, *exc):
        self.count = None
        if self.p is None:
            return False
        self.p.send_signal(signal.SIGINT)
        try:
            err = self.p.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            self.p.kill()
            return False
        for ln in err.splitlines():
            f = ln.split(",")
            if len(f) > 2 and f[2].startswith("instructions") and f[0].strip().isdigit():
                self.count = int(f[0])
        return False


def per_unit(count, n):
    return None if count is None else round(count / max(1, n))


# ---------------------------------------------------------------- upstream

def sse_chunk(i, content=None, finish=None, usage=None):
    ev = {"id": "chatcmpl-scale", "object": "chat.completion.chunk", "created": 1700000000,
          "model": "scale-model", "choices": []}
    if usage is None:
        delta = {"content": content} if content is not None else {"role": "assistant", "content": ""}
        ev["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    else:
        ev["usage"] = usage
    return ("data: " + json.dumps(ev, separators=(",", ":")) + "\n\n").encode()


def http_chunk(b):
    return b"%x\r\n%s\r\n" % (len(b), b)


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def stream_parts(n):
    """The HTTP/1.1 chunks of an OpenAI stream with `n` content chunks: the head with
    the role chunk, `n` content chunks, and the tail (finish, usage, [DONE], end)."""
    head = STREAM_HEAD + http_chunk(sse_chunk(0))
    body = [http_chunk(sse_chunk(i, content=f"tok{i % 10} ")) for i in range(n)]
    tail = (http_chunk(sse_chunk(n, content="", finish="stop"))
            + http_chunk(sse_chunk(n, usage={"prompt_tokens": 20, "completion_tokens": n,
                                             "total_tokens": 20 + n}))
            + http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return head, body, tail


JSON_ANSWER = json.dumps({
    "id": "chatcmpl-scale", "object": "chat.completion", "created": 1700000000, "model": "scale-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}).encode()
JSON_RESP = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
             % len(JSON_ANSWER)) + JSON_ANSWER


class Upstream(asyncio.Protocol):
    cache = {}
    stats = {"requests": 0, "open": 0, "peak": 0}

    def connection_made(self, tr):
        self.tr = tr
        self.buf = bytearray()
        self.need = None  # (header end, content length) of the request being read
        self.busy = False
        s = Upstream.stats
        s["open"] += 1
        s["peak"] = max(s["peak"], s["open"])

    def connection_lost(self, exc):
        Upstream.stats["open"] -= 1
        self.tr = None

    def data_received(self, data):
        self.buf += data
        self.pump()

    def pump(self):
        while not self.busy and self.tr is not None:
            if self.need is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).decode("latin-1")
                clen = 0
                for ln in head.split("\r\n")[1:]:
                    k, _, v = ln.partition(":")
                    if k.strip().lower() == "content-length":
                        clen = int(v)
                self.need = (end + 4, clen, head.split(" ", 2)[1])
            start, clen, path = self.need
            if len(self.buf) < start + clen:
                return
            del self.buf[:start + clen]
            self.need = None
            Upstream.stats["requests"] += 1
            self.answer(path)

    def answer(self, path):
        parts = path.strip("/").split("/")
        mode = parts[0]
        if mode == "json":
            self.tr.write(JSON_RESP)
            return
        if mode == "fast":
            n = int(parts[1])
            key = ("fast", n)
            if key not in Upstream.cache:
                h, b, t = stream_parts(n)
                Upstream.cache[key] = h + b"".join(b) + t
            self.tr.write(Upstream.cache[key])
            return
        if mode == "slow":
            n, ms = int(parts[1]), int(parts[2])
            key = ("slow", n)
            if key not in Upstream.cache:
                Upstream.cache[key] = stream_parts(n)
            head, body, tail = Upstream.cache[key]
            self.busy = True
            self.tr.write(head)
            loop = asyncio.get_running_loop()

            def step(i):
                if self.tr is None:
                    return
                if i < n:
                    self.tr.write(body[i])
                    loop.call_later(ms / 1000.0, step, i + 1)
                else:
                    self.tr.write(tail)
                    self.busy = False
                    self.pump()
            loop.call_later(ms / 1000.0, step, 0)
            return
        self.tr.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


def cmd_upstream(a):
    raise_nofile()

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Upstream, HOST, a.port, backlog=8192, reuse_address=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with srv:
            await stop.wait()
        log(f"upstream: {Upstream.stats['requests']} requests, peak {Upstream.stats['peak']} connections")
    asyncio.run(main())


# ---------------------------------------------------------------- configs

def gateway_head(listen, admin_port, extra_limits=""):
    return f"""# generated by bench/scale/scale.py
listen: {listen}
admin:
  listen: {HOST}:{admin_port}
  key_env: SCALE_ADMIN_KEY
limits:
  max_body_bytes: 4194304
{extra_limits}"""


def cmd_gen_small(a):
    d = os.path.abspath(a.dir)
    for sub in ("providers", "prompts"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    up = f"http://{HOST}:{a.upstream_port}"
    limits = (f"  max_connections: {a.max_connections}\n  max_concurrency: {a.max_connections}\n"
              f"  request_timeout: 2m\n")
    routes = ["routes:"]
    provs = {"json": a.json_url or f"{up}/json/v1", "slow": f"{up}/slow/{a.slow_chunks}/{a.slow_interval_ms}/v1"}
    for n in (10, 100, 1000):
        provs[f"fast{n}"] = f"{up}/fast/{n}/v1"
    for name, url in provs.items():
        with open(os.path.join(d, "providers", f"up-{name}.yaml"), "w") as f:
            f.write(f"kind: openai\nbase_url: {url}\nself_hosted: true\n"
                    f"timeouts: {{connect: 5s, headers: 30s, idle: 30s, total: 5m}}\n")
        routes.append(f"  {name}:\n    provider: up-{name}\n    model: scale-model")
    with open(os.path.join(d, "promptgate.yaml"), "w") as f:
        f.write(gateway_head(f"{HOST}:{a.port}", a.admin_port, limits) + "\n".join(routes) + "\n")
    print(d)


PROMPT_VERSION = """  {v}:
    description: wording {v} of prompt {p}
    route: {route}
    params: {{temperature: 0.{v}, max_tokens: {mt}}}
    messages:
      - role: system
        content: |
          You are support agent {p} (wording {v}). Answer from the policy points only.
          {{% if policy_points %}}Policy:
          {{% for x in policy_points %}}- {{{{ x }}}}
          {{% endfor %}}{{% endif %}}
      - role: user
        content: "{{{{ customer_name | title }}}}{{% if vip %}} (VIP){{% endif %}} asks: {{{{ question }}}}"
"""


def cmd_gen_large(a):
    """1,000 routes (every 10th a fallback chain of 3, every 10th a split over prompt
    versions), 200 providers, 1,000 prompts x 5 versions with labels. The route `json`
    (what the per-request comparison calls) is the same single target as in the small
    config."""
    d = os.path.abspath(a.dir)
    for sub in ("providers", "prompts"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    up = a.upstream_url
    for i in range(a.providers):
        with open(os.path.join(d, "providers", f"p{i:03d}.yaml"), "w") as f:
            f.write(f"# provider {i}\nkind: openai\nbase_url: {up}\nself_hosted: true\n"
                    f"timeouts: {{connect: 5s, headers: 30s, idle: 30s, total: 5m}}\n")
    routes = ["routes:", "  json:\n    provider: p000\n    model: scale-model"]
    for r in range(a.routes - 1):
        p = r % a.providers
        if r % 10 == 3:
            routes.append(f"  r{r:04d}:\n    description: fallback chain {r}\n    targets:\n"
                          + "".join(f"      - {{provider: p{(p + k) % a.providers:03d}, model: m{k}}}\n"
                                    for k in range(3)).rstrip("\n"))
        elif r % 10 == 7:
            routes.append(f"  r{r:04d}:\n    description: split over prompt versions {r}\n"
                          f"    split:\n      subject: user\n      arms:\n"
                          f"        - {{name: a, weight: 50, provider: p{p:03d}, model: m, prompt: {{version: 4}}}}\n"
                          f"        - {{name: b, weight: 50, provider: p{(p + 1) % a.providers:03d}, model: m, prompt: {{label: production}}}}")
        else:
            routes.append(f"  r{r:04d}:\n    provider: p{p:03d}\n    model: m{r}\n"
                          f"    params: {{temperature: 0.5}}")
    with open(os.path.join(d, "promptgate.yaml"), "w") as f:
        f.write(gateway_head(f"{HOST}:{a.port}", a.admin_port) + "\n".join(routes) + "\n")
    nroutes = a.routes - 1
    for i in range(a.prompts):
        out = [f"# prompt {i}", f"description: generated prompt {i}", "variables:",
               "  customer_name: {type: string}", "  question: {type: string}",
               "  vip: {type: boolean, default: false}",
               "  policy_points: {type: list, default: []}",
               "labels:", "  production: 3", f"  staging: {a.versions}", "versions:"]
        for v in range(1, a.versions + 1):
            out.append(PROMPT_VERSION.format(v=v, p=i, route=f"r{(i * 7 + v) % nroutes:04d}",
                                             mt=100 + v).rstrip("\n"))
        with open(os.path.join(d, "prompts", f"q{i:04d}.yaml"), "w") as f:
            f.write("\n".join(out) + "\n")
    print(d)


# ---------------------------------------------------------------- HTTP client bits

def head(path, port, body, extra=""):
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


def chat_body(route, stream, content="Say something short.", user=None):
    b = {"model": route, "messages": [{"role": "user", "content": content}], "max_tokens": 64}
    if stream:
        b["stream"] = True
    if user:
        b["user"] = user
    return json.dumps(b, separators=(",", ":")).encode()


class Reader:
    """Reads one HTTP/1.1 response (content-length or chunked) from a blocking socket."""

    def __init__(self, sock):
        self.s = sock
        self.buf = bytearray()

    def response(self):
        s = self.s
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            d = s.recv(262144)
            if not d:
                raise ConnectionError("closed before headers")
            self.buf += d
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        del self.buf[:end + 4]
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                d = s.recv(262144)
                if not d:
                    raise ConnectionError("closed mid-body")
                self.buf += d
            body = bytes(self.buf[:n])
            del self.buf[:n]
            return status, headers, body
        # chunked: parse chunk by chunk
        out = bytearray()
        while True:
            while True:
                j = self.buf.find(b"\r\n")
                if j >= 0:
                    break
                d = s.recv(262144)
                if not d:
                    raise ConnectionError("closed mid-stream")
                self.buf += d
            n = int(bytes(self.buf[:j]).split(b";")[0], 16)
            while len(self.buf) < j + 2 + n + 2:
                d = s.recv(262144)
                if not d:
                    raise ConnectionError("closed mid-stream")
                self.buf += d
            out += self.buf[j + 2:j + 2 + n]
            del self.buf[:j + 2 + n + 2]
            if n == 0:
                return status, headers, bytes(out)


def connect(port):
    s = socket.create_connection((HOST, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def count_events(body):
    return body.count(b"\ndata: ") + (1 if body.startswith(b"data: ") else 0)


# ---------------------------------------------------------------- phase: streams

class StreamClient(asyncio.Protocol):
    def __init__(self, res, req, done):
        self.res, self.req, self.done = res, req, done
        self.buf = bytearray()
        self.finished = False

    def connection_made(self, tr):
        self.tr = tr
        tr.write(self.req)

    def data_received(self, data):
        if self.finished:
            return
        self.buf += data
        if self.buf.endswith(b"\r\n0\r\n\r\n") or self.buf.endswith(b"\r\n\r\n0\r\n\r\n"):
            self.finish()

    def finish(self, err=None):
        if self.finished:
            return
        self.finished = True
        b = bytes(self.buf)
        r = self.res
        if err is None:
            status = b[9:12]
            if status != b"200":
                err = f"status {status.decode('latin-1', 'replace')}"
            elif b"data: [DONE]" not in b:
                err = "no [DONE]"
            else:
                r["events"] += b.count(b"data: ")
        if err:
            r["errors"][err] = r["errors"].get(err, 0) + 1
        else:
            r["complete"] += 1
        self.buf = bytearray()
        self.tr.close()
        self.done()

    def connection_lost(self, exc):
        if not self.finished:
            self.finish(f"connection lost: {exc!r}"[:80])


def cmd_streams(a):
    nofile = raise_nofile()
    pg = a.pg_pid
    n = a.n
    if n + 100 > nofile:
        raise SystemExit(f"client open-file limit {nofile} is too low for {n} streams")
    res = {"streams": n, "complete": 0, "errors": {}, "events": 0, "connect_errors": 0}

    async def main():
        loop = asyncio.get_running_loop()
        left = n
        all_done = asyncio.Event()

        def done():
            nonlocal left
            left -= 1
            if left == 0:
                all_done.set()
        body = chat_body("slow", True)
        req = head("/v1/chat/completions", a.port, body)
        samples = []
        stop = asyncio.Event()

        async def sample():
            while not stop.is_set():
                st = proc_status(pg)
                samples.append((time.monotonic(), st.get("VmRSS", 0), proc_fds(pg)))
                await asyncio.sleep(0.25)
        await asyncio.sleep(0.5)
        rss0 = proc_status(pg)["VmRSS"]
        fds0 = proc_fds(pg)
        cpu0 = proc_cpu_s(pg)
        fg = Foreign([pg, a.upstream_pid])
        f0 = fg.sample()
        t0 = time.monotonic()
        sampler = asyncio.ensure_future(sample())
        # Open the connections at a steady pace (the listen backlog is finite).
        pace = 1.0 / a.open_rate
        sem = asyncio.Semaphore(256)

        async def open_one():
            async with sem:
                try:
                    await loop.create_connection(lambda: StreamClient(res, req, done), HOST, a.port)
                except OSError as e:
                    res["connect_errors"] += 1
                    k = f"connect: {e.strerror or e!r}"[:80]
                    res["errors"][k] = res["errors"].get(k, 0) + 1
                    done()
        tasks = []
        for i in range(n):
            tasks.append(asyncio.ensure_future(open_one()))
            target = t0 + (i + 1) * pace
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        t_opened = time.monotonic()
        try:
            await asyncio.wait_for(all_done.wait(), timeout=a.timeout)
        except asyncio.TimeoutError:
            res["errors"]["timeout (streams still open)"] = left
        t1 = time.monotonic()
        cpu1 = proc_cpu_s(pg)
        res["foreign_cpu"] = fg.fraction(f0)
        await asyncio.sleep(3)
        stop.set()
        await sampler
        st_after = proc_status(pg)
        peak = max(samples, key=lambda s: s[1])
        res.update({
            "open_seconds": round(t_opened - t0, 1),
            "wall_seconds": round(t1 - t0, 1),
            "rss_before_kib": rss0,
            "rss_peak_kib": peak[1],
            "rss_after_kib": st_after["VmRSS"],
            "vmhwm_kib": st_after["VmHWM"],
            "fds_before": fds0,
            "fds_peak": max(s[2] for s in samples),
            "fds_after": proc_fds(pg),
            "rss_per_connection_kib": round((peak[1] - rss0) / max(1, n), 1),
            "cpu_seconds": round(cpu1 - cpu0, 2),
            "cpu_us_per_stream": round((cpu1 - cpu0) / max(1, n) * 1e6, 0),
            "cpu_us_per_event": round((cpu1 - cpu0) / max(1, res["events"]) * 1e6, 1),
            "threads": st_after.get("Threads"),
        })
    asyncio.run(main())
    res["error_count"] = sum(res["errors"].values())
    res["machine"] = machine_state()
    write_phase(a.out, "streams", res)
    log(f"streams: {res['complete']}/{n} complete, errors {res['errors']}, RSS {res['rss_before_kib']} -> "
        f"{res['rss_peak_kib']} -> {res['rss_after_kib']} KiB, {res['rss_per_connection_kib']} KiB/conn, "
        f"CPU {res['cpu_seconds']} s")
    if res["error_count"] or res["complete"] != n:
        sys.exit(1)


# ---------------------------------------------------------------- phases: chunks, body

def per_request(a, route, body, stream, seconds, max_n, expect=None):
    """Sequential requests on one keep-alive connection for `seconds` (at most `max_n`):
    the gateway's CPU per request and its own time (x-promptgate-overhead-us)."""
    pg = a.pg_pid
    s = connect(a.port)
    rd = Reader(s)
    req = head("/v1/chat/completions", a.port, body)
    for _ in range(20):  # warm-up
        s.sendall(req)
        rd.response()
    fg = Foreign([pg, a.upstream_pid])
    own, bad, n = [], 0, 0
    with Instructions(pg) as ins:
        f0 = fg.sample()
        cpu0 = proc_cpu_s(pg)
        t0 = time.monotonic()
        while n < max_n and time.monotonic() - t0 < seconds:
            s.sendall(req)
            st, h, b = rd.response()
            n += 1
            if st != 200 or (expect and not expect(b)):
                bad += 1
            if "x-promptgate-overhead-us" in h:
                own.append(int(h["x-promptgate-overhead-us"]))
        cpu = proc_cpu_s(pg) - cpu0
    wall = time.monotonic() - t0
    s.close()
    own.sort()
    return {"requests": n, "errors": bad, "wall_s": round(wall, 2),
            "cpu_us_per_request": round(cpu / max(1, n) * 1e6, 1),
            "instructions_per_request": per_unit(ins.count, n),
            "own_us_p50": own[len(own) // 2] if own else None,
            "own_us_p90": own[int(len(own) * 0.9)] if own else None,
            "foreign_cpu": fg.fraction(f0)}


def cmd_chunks(a):
    out = {"sizes": {}}
    for n in (10, 100, 1000):
        r = per_request(a, f"fast{n}", chat_body(f"fast{n}", True), True, a.seconds, a.max_n,
                        expect=lambda b, n=n: b.count(b"data: ") >= n + 2 and b"[DONE]" in b)
        r["chunks"] = n
        r["cpu_us_per_chunk"] = round(r["cpu_us_per_request"] / n, 2)
        r["instructions_per_chunk"] = per_unit(r["instructions_per_request"], n)
        out["sizes"][str(n)] = r
        log(f"chunks {n}: {r}")
    s = out["sizes"]
    # The marginal cost of a chunk between sizes: flat means linear.
    out["marginal_us_per_chunk"] = {
        "10->100": round((s["100"]["cpu_us_per_request"] - s["10"]["cpu_us_per_request"]) / 90, 2),
        "100->1000": round((s["1000"]["cpu_us_per_request"] - s["100"]["cpu_us_per_request"]) / 900, 2),
    }
    if all(v["instructions_per_request"] for v in s.values()):
        out["marginal_instructions_per_chunk"] = {
            "10->100": round((s["100"]["instructions_per_request"] - s["10"]["instructions_per_request"]) / 90),
            "100->1000": round((s["1000"]["instructions_per_request"] - s["100"]["instructions_per_request"]) / 900),
        }
    out["machine"] = machine_state()
    write_phase(a.out, "chunks", out)
    if any(v["errors"] for v in s.values()):
        sys.exit(1)


def cmd_body(a):
    out = {"sizes": {}}
    for kb in (1, 10, 100, 1024):
        # One user message of about `kb` KiB of words (JSON-escaped text, the common case).
        words = ("lorem ipsum dolor sit amet consectetur " * (kb * 1024 // 39 + 1))[: kb * 1024 - 120]
        body = chat_body("json", False, content=words)
        r = per_request(a, "json", body, False, a.seconds, a.max_n,
                        expect=lambda b: b.startswith(b"{") and b"\"ok\"" in b)
        r["body_bytes"] = len(body)
        r["cpu_us_per_kib"] = round(r["cpu_us_per_request"] / (len(body) / 1024), 2)
        r["instructions_per_kib"] = per_unit(r["instructions_per_request"], len(body) / 1024)
        out["sizes"][str(kb)] = r
        log(f"body {kb} KiB: {r}")
    s = out["sizes"]
    kib = {k: s[k]["body_bytes"] / 1024 for k in s}
    out["marginal_us_per_kib"] = {
        "1->10": round((s["10"]["cpu_us_per_request"] - s["1"]["cpu_us_per_request"]) / (kib["10"] - kib["1"]), 2),
        "10->100": round((s["100"]["cpu_us_per_request"] - s["10"]["cpu_us_per_request"]) / (kib["100"] - kib["10"]), 2),
        "100->1024": round((s["1024"]["cpu_us_per_request"] - s["100"]["cpu_us_per_request"]) / (kib["1024"] - kib["100"]), 2),
    }
    if all(v["instructions_per_request"] for v in s.values()):
        ins = {k: s[k]["instructions_per_request"] for k in s}
        out["marginal_instructions_per_kib"] = {
            "1->10": round((ins["10"] - ins["1"]) / (kib["10"] - kib["1"])),
            "10->100": round((ins["100"] - ins["10"]) / (kib["100"] - kib["10"])),
            "100->1024": round((ins["1024"] - ins["100"]) / (kib["1024"] - kib["100"])),
        }
    out["machine"] = machine_state()
    write_phase(a.out, "body", out)
    if any(v["errors"] for v in s.values()):
        sys.exit(1)


# ---------------------------------------------------------------- phase: config

def http(method, port, path, key=None, timeout=10):
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method,
                                 data=b"" if method == "POST" else None)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def cmd_config(a):
    """Times `check`, start-until-ready and both reloads for the config in --dir."""
    cfg = os.path.join(a.dir, "promptgate.yaml")
    env = dict(os.environ, SCALE_ADMIN_KEY="scale-admin-key", RUST_LOG="warn")
    res = {"label": a.label, "shape": a.shape}
    checks = []
    for _ in range(a.repeat):
        t0 = time.monotonic()
        p = subprocess.run([a.bin, "check", "--config", cfg], capture_output=True, text=True, env=env)
        checks.append(time.monotonic() - t0)
        if p.returncode != 0:
            raise SystemExit(f"promptgate check failed: {p.stdout[-800:]} {p.stderr[-800:]}")
    res["check_s"] = round(statistics.median(checks), 3)
    starts, reloads, touches = [], [], []
    rss = None
    for i in range(a.repeat):
        t0 = time.monotonic()
        pr = subprocess.Popen([a.bin, "serve", "--config", cfg], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(a.log, "a"))
        try:
            while True:
                if pr.poll() is not None:
                    raise SystemExit("gateway exited during start-up (see the log)")
                try:
                    if http("GET", a.port, "/healthz", timeout=1)[0] == 200:
                        break
                except OSError:
                    time.sleep(0.005)
            starts.append(time.monotonic() - t0)
            # admin listener may come up a moment later
            for _ in range(200):
                try:
                    http("GET", a.admin_port, "/admin/status", key="scale-admin-key")
                    break
                except OSError:
                    time.sleep(0.01)
            t0 = time.monotonic()
            st, _ = http("POST", a.admin_port, "/admin/reload", key="scale-admin-key", timeout=60)
            reloads.append(time.monotonic() - t0)
            if st != 200:
                raise SystemExit(f"/admin/reload answered {st}")

            def succeeded():
                # From /metrics, which is cheap (/admin/status lists every prompt version).
                text = http("GET", a.port, "/metrics")[1].decode()
                n = {"ok": 0, "error": 0}
                for ln in text.splitlines():
                    if ln.startswith("promptgate_config_reloads_total{"):
                        for k in n:
                            if f'result="{k}"' in ln:
                                n[k] = int(float(ln.rsplit(" ", 1)[1]))
                return n["ok"], n["error"]
            s0, f0 = succeeded()
            # A file change: a new route appended to the gateway file.
            with open(cfg, "a") as f:
                f.write(f"  touched-{i}-{time.time_ns()}:\n    provider: {a.touch_provider}\n    model: touched\n")
            t0 = time.monotonic()
            while True:
                s1, f1 = succeeded()
                if s1 > s0 or f1 > f0:
                    break
                if time.monotonic() - t0 > 30:
                    raise SystemExit("file change: no reload within 30 s")
                time.sleep(0.01)
            touches.append(time.monotonic() - t0)
            if f1 > f0:
                raise SystemExit("file change: the reload failed")
            rss = proc_status(pr.pid)
        finally:
            pr.terminate()
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
    res["start_until_ready_s"] = round(statistics.median(starts), 3)
    res["admin_reload_s"] = round(statistics.median(reloads), 3)
    res["file_change_reload_s"] = round(statistics.median(touches), 3)
    res["file_change_note"] = "file written → reload counted in /metrics (includes the watcher's 200 ms debounce)"
    res["rss_kib"] = rss
    res["runs"] = a.repeat
    res["machine"] = machine_state()
    write_phase(a.out, f"config-{a.label}", res)
    log(f"config {a.label}: {res}")


def cmd_cost(a):
    """Paired saturation runs (like bench/ab.sh): the gateway with the small config, then
    with the large one, `wrk -t1 -c64`, alternating; CPU per request from /proc."""
    env = dict(os.environ, SCALE_ADMIN_KEY="scale-admin-key", RUST_LOG="warn")
    body_file = os.path.join(a.tmp, "cost_body.json")
    with open(body_file, "wb") as f:
        f.write(chat_body("json", False))
    wenv = dict(os.environ, WRK_BODY_FILE=body_file)
    url = f"http://{HOST}:{a.port}/v1/chat/completions"
    out = {"small": [], "large": [], "pairs": a.pairs, "seconds": a.seconds}

    def wrk(d):
        p = subprocess.run([a.wrk, "-t1", "-c64", f"-d{d}s", "--timeout", "5s", "-s", a.lua, url],
                           capture_output=True, text=True, env=wenv, timeout=d + 30)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("WRKJSON ")]
        if p.returncode != 0 or not line:
            raise SystemExit(f"wrk failed: {p.stdout[-400:]} {p.stderr[-400:]}")
        return json.loads(line[-1][8:])
    for i in range(a.pairs):
        for label, cfg in (("small", a.small), ("large", a.large)):
            pr = subprocess.Popen([a.bin, "serve", "--config", os.path.join(cfg, "promptgate.yaml")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=open(a.log, "a"))
            try:
                for _ in range(1000):
                    try:
                        if http("GET", a.port, "/healthz", timeout=1)[0] == 200:
                            break
                    except OSError:
                        time.sleep(0.01)
                wrk(2)
                fg = Foreign([pr.pid])
                with Instructions(pr.pid) as ins:
                    f0 = fg.sample()
                    c0 = proc_cpu_s(pr.pid)
                    j = wrk(a.seconds)
                    c1 = proc_cpu_s(pr.pid)
                errs = sum(v for k, v in j.items() if k.startswith("errors_"))
                r = {"rps": round(j["requests"] / (j["duration_us"] / 1e6)),
                     "cpu_us_per_request": round((c1 - c0) / max(1, j["requests"]) * 1e6, 1),
                     "instructions_per_request": per_unit(ins.count, j["requests"]),
                     "errors": errs, "foreign_cpu": fg.fraction(f0)}
                out[label].append(r)
                log(f"cost {label} pair {i + 1}: {r}")
            finally:
                pr.terminate()
                try:
                    pr.wait(10)
                except subprocess.TimeoutExpired:
                    pr.kill()
                    pr.wait()
    for label in ("small", "large"):
        out[f"{label}_cpu_us_median"] = round(statistics.median(r["cpu_us_per_request"] for r in out[label]), 1)
        out[f"{label}_rps_median"] = statistics.median(r["rps"] for r in out[label])
        ins = [r["instructions_per_request"] for r in out[label] if r["instructions_per_request"]]
        out[f"{label}_instructions_median"] = statistics.median(ins) if ins else None
    out["machine"] = machine_state()
    write_phase(a.out, "config-cost", out)
    if any(r["errors"] for lab in ("small", "large") for r in out[lab]):
        sys.exit(1)


# ---------------------------------------------------------------- report

def write_phase(out, name, res):
    os.makedirs(out, exist_ok=True)
    res["at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    with open(os.path.join(out, f"scale-phase-{name}.json"), "w") as f:
        json.dump(res, f, indent=2)


def load_phase(out, name):
    try:
        with open(os.path.join(out, f"scale-phase-{name}.json")) as f:
            return json.load(f)
    except OSError:
        return None


def fmt_int(x):
    return "—" if x is None else f"{x:,.0f}"


def cmd_report(a):
    names = ["streams", "chunks", "body", "config-small", "config-large", "config-cost"]
    r = {k: load_phase(a.out, k) for k in names}
    r["machine"] = {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "cpu_model": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                       if ln.startswith("model name")), "?"),
                    "version": a.version}
    o = [f"### Scale benchmark — {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n",
         f"Machine: {r['machine']['cpus']} cores ({r['machine']['cpu_model']}), kernel {r['machine']['kernel']}; "
         f"{a.version}. Each phase's load average and compilers running are in the JSON.\n"]
    s = r["streams"]
    if s:
        o += ["#### Concurrent slow streams through one replica\n",
              "| measure | value |", "|---|---:|",
              f"| concurrent streams (each {a.slow_chunks} chunks, 1 per {a.slow_interval_ms} ms) | {s['streams']:,} |",
              f"| complete / errors | {s['complete']:,} / {s['error_count']} |",
              f"| RSS before / peak / after (MiB) | {s['rss_before_kib'] / 1024:.1f} / {s['rss_peak_kib'] / 1024:.1f} / {s['rss_after_kib'] / 1024:.1f} |",
              f"| RSS per connection (KiB) | {s['rss_per_connection_kib']} |",
              f"| gateway fds before / peak / after | {s['fds_before']} / {s['fds_peak']} / {s['fds_after']} |",
              f"| gateway CPU (s) / per stream (µs) / per event (µs) | {s['cpu_seconds']} / {s['cpu_us_per_stream']:.0f} / {s['cpu_us_per_event']} |",
              f"| connections opened in (s) / phase wall time (s) | {s['open_seconds']} / {s['wall_seconds']} |",
              f"| other processes' CPU (share of machine) | {s['foreign_cpu'] * 100:.0f}% |", ""]
        if s["errors"]:
            o.append(f"Errors: {s['errors']}\n")
    c = r["chunks"]
    if c:
        o += ["#### Cost per streamed chunk\n",
              "| chunks per stream | requests | gateway CPU / request (µs) | per chunk (µs) | instructions / chunk | own time p50 / p90 (µs) | other CPU |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for k, v in c["sizes"].items():
            o.append(f"| {k} | {v['requests']} | {v['cpu_us_per_request']} | {v['cpu_us_per_chunk']} | "
                     f"{fmt_int(v.get('instructions_per_chunk'))} | "
                     f"{v['own_us_p50']} / {v['own_us_p90']} | {v['foreign_cpu'] * 100:.0f}% |")
        m = c["marginal_us_per_chunk"]
        mi = c.get("marginal_instructions_per_chunk") or {}
        o.append(f"\nMarginal cost per chunk: 10→100 {m['10->100']} µs, 100→1000 {m['100->1000']} µs; "
                 f"instructions 10→100 {fmt_int(mi.get('10->100'))}, 100→1000 {fmt_int(mi.get('100->1000'))} "
                 f"(equal = linear).\n")
    b = r["body"]
    if b:
        o += ["#### Cost per KiB of request body\n",
              "| body | requests | gateway CPU / request (µs) | per KiB (µs) | instructions / request | own time p50 / p90 (µs) | other CPU |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for k, v in b["sizes"].items():
            o.append(f"| {v['body_bytes']:,} B | {v['requests']} | {v['cpu_us_per_request']} | {v['cpu_us_per_kib']} | "
                     f"{fmt_int(v.get('instructions_per_request'))} | "
                     f"{v['own_us_p50']} / {v['own_us_p90']} | {v['foreign_cpu'] * 100:.0f}% |")
        m = b["marginal_us_per_kib"]
        mi = b.get("marginal_instructions_per_kib") or {}
        o.append(f"\nMarginal cost per KiB: 1→10 {m['1->10']} µs, 10→100 {m['10->100']} µs, "
                 f"100→1024 {m['100->1024']} µs; instructions 1→10 {fmt_int(mi.get('1->10'))}, "
                 f"10→100 {fmt_int(mi.get('10->100'))}, 100→1024 {fmt_int(mi.get('100->1024'))} (equal = linear).\n")
    cs, cl, cc = r["config-small"], r["config-large"], r["config-cost"]
    if cs or cl:
        o += ["#### Large configuration\n",
              "| measure | small config | large config |", "|---|---:|---:|"]

        def g(x, k, f="{:.3f}"):
            return f.format(x[k]) if x and x.get(k) is not None else "—"
        o.append(f"| `promptgate check` (s) | {g(cs, 'check_s')} | {g(cl, 'check_s')} |")
        o.append(f"| start until `/healthz` answers (s) | {g(cs, 'start_until_ready_s')} | {g(cl, 'start_until_ready_s')} |")
        o.append(f"| `POST /admin/reload` (s) | {g(cs, 'admin_reload_s')} | {g(cl, 'admin_reload_s')} |")
        o.append(f"| file change → reload done (s) ¹ | {g(cs, 'file_change_reload_s')} | {g(cl, 'file_change_reload_s')} |")
        rs = lambda x: f"{x['rss_kib']['VmRSS'] / 1024:.1f}" if x and x.get("rss_kib") else "—"
        o.append(f"| RSS after the reloads (MiB) | {rs(cs)} | {rs(cl)} |")
        if cc:
            o.append(f"| gateway CPU per request at saturation, median of {cc['pairs']} paired runs (µs) | "
                     f"{cc['small_cpu_us_median']} | {cc['large_cpu_us_median']} |")
            o.append(f"| gateway instructions per request at saturation, median | "
                     f"{fmt_int(cc.get('small_instructions_median'))} | {fmt_int(cc.get('large_instructions_median'))} |")
            o.append(f"| req/s at saturation, median | {cc['small_rps_median']:,.0f} | {cc['large_rps_median']:,.0f} |")
        if cl:
            o.append(f"\nLarge: {cl.get('shape', '')}. ¹ {cl['file_change_note']}. Medians of {cl['runs']} runs.\n")
    md = "\n".join(o) + "\n"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "scale-latest.json"), "w") as f:
        json.dump(r, f, indent=2)
    with open(os.path.join(a.out, "scale-latest.md"), "w") as f:
        f.write(md)
    print(md)


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("upstream")
    u.add_argument("--port", type=int, required=True)
    g = sub.add_parser("gen-small")
    g.add_argument("--dir", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--admin-port", type=int, required=True)
    g.add_argument("--upstream-port", type=int, required=True)
    g.add_argument("--max-connections", type=int, default=12000)
    g.add_argument("--json-url", default=None)
    g.add_argument("--slow-chunks", type=int, default=20)
    g.add_argument("--slow-interval-ms", type=int, default=1000)
    g = sub.add_parser("gen-large")
    g.add_argument("--dir", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--admin-port", type=int, required=True)
    g.add_argument("--upstream-url", required=True)
    g.add_argument("--routes", type=int, default=1000)
    g.add_argument("--providers", type=int, default=200)
    g.add_argument("--prompts", type=int, default=1000)
    g.add_argument("--versions", type=int, default=5)
    for name in ("streams", "chunks", "body"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--pg-pid", type=int, required=True)
        p.add_argument("--upstream-pid", type=int, required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--seconds", type=float, default=4)
        p.add_argument("--max-n", type=int, default=5000)
        if name == "streams":
            p.add_argument("--n", type=int, required=True)
            p.add_argument("--open-rate", type=float, default=2000)
            p.add_argument("--timeout", type=float, default=120)
    c = sub.add_parser("config")
    c.add_argument("--dir", required=True)
    c.add_argument("--bin", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--admin-port", type=int, required=True)
    c.add_argument("--label", required=True)
    c.add_argument("--touch-provider", required=True)
    c.add_argument("--log", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--repeat", type=int, default=3)
    c.add_argument("--shape", default="")
    c = sub.add_parser("cost")
    for k in ("tmp", "bin", "small", "large", "wrk", "lua", "log", "out"):
        c.add_argument(f"--{k}", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--pairs", type=int, default=3)
    c.add_argument("--seconds", type=int, default=6)
    r = sub.add_parser("report")
    r.add_argument("--out", required=True)
    r.add_argument("--version", default="promptgate")
    r.add_argument("--slow-chunks", type=int, default=20)
    r.add_argument("--slow-interval-ms", type=int, default=1000)
    a = ap.parse_args()
    {"upstream": cmd_upstream, "gen-small": cmd_gen_small, "gen-large": cmd_gen_large,
     "streams": cmd_streams, "chunks": cmd_chunks, "body": cmd_body, "config": cmd_config, "cost": cmd_cost,
     "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
