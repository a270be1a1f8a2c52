"""A loopback OTLP/HTTP traces receiver for the tests.

Listens on 127.0.0.1 (an ephemeral port unless one is given), decodes every
POST /v1/traces body as an ExportTraceServiceRequest (protobuf, from the
opentelemetry-proto package) and appends each span to OUT as one JSON object
per line: ids in hex, kind and status as numbers, attributes as plain values,
the attribute keys set more than once, the resource's service.name, and the
request's headers (lower-cased names).
Prints `listening PORT` once ready. Anything else is answered 404; a body that
does not decode is answered 400 and recorded as {"error": ...}.

usage: otlp_receiver.py OUT [PORT]
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OUT = sys.argv[1]
LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    if kind is None:
        return None
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


def write(lines):
    with LOCK, open(OUT, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", content_type="application/x-protobuf"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if self.path != "/v1/traces":
            self.answer(404)
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            req = ExportTraceServiceRequest.FromString(body)
        except Exception as e:  # noqa: BLE001 - recorded for the test to see
            write([{"error": str(e)}])
            self.answer(400)
            return
        lines = []
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    keys = [kv.key for kv in s.attributes]
                    lines.append(
                        {
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "name": s.name,
                            "kind": s.kind,
                            "start_ns": s.start_time_unix_nano,
                            "end_ns": s.end_time_unix_nano,
                            "attributes": attributes(s.attributes),
                            "duplicate_keys": sorted({k for k in keys if keys.count(k) > 1}),
                            "status": s.status.code,
                            "service": resource.get("service.name"),
                            "scope": ss.scope.name,
                            "content_type": headers.get("content-type"),
                            "headers": headers,
                        }
                    )
        write(lines)
        self.answer(200, ExportTraceServiceResponse().SerializeToString())


def main():
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
