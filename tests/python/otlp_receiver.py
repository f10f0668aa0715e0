#!/usr/bin/env python3
"""An OTLP trace receiver for weft's span-export tests, built on the field's own Python packages
(grpcio with TLS server credentials; http.server + ssl for OTLP/HTTP; the opentelemetry-proto types).

It behaves as a demanding collector: it requires a header (`--require-header NAME=VALUE`: missing or
wrong -> gRPC UNAUTHENTICATED / HTTP 401, spans not kept), fails the first `--unavailable N` exports
with a retryable answer (gRPC UNAVAILABLE / HTTP 503 with `Retry-After: 1`) and keeps nothing of them, and can answer a
partial success (`--partial N`: N spans rejected, with a message).

Prints `listening on HOST:PORT`, then one JSON line per export request ({"export": {...}}) and one per
span kept ({"trace_id": hex, "span_id": hex, "parent": hex, "name", "kind", "service", "resource"}).
"""

import argparse
import gzip
import json
import ssl
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

LOCK = threading.Lock()
SEEN = [0]


def emit(obj):
    with LOCK:
        print(json.dumps(obj, sort_keys=True), flush=True)


def next_export():
    with LOCK:
        SEEN[0] += 1
        return SEEN[0]


def spans_of_proto(req):
    for rs in req.resource_spans:
        resource = {a.key: a.value.string_value for a in rs.resource.attributes}
        service = resource.get("service.name", "")
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": s.kind,
                    "service": service,
                    "resource": resource,
                    "attributes": {a.key: a.value.string_value for a in s.attributes},
                }


def spans_of_json(doc):
    """Reads the OTLP JSON mapping as the specification writes it (hex ids, lowerCamelCase, enums as
    integers): protobuf's own JSON parser would read the ids as base64, so it is walked by hand."""
    for rs in doc.get("resourceSpans", []):
        attrs = rs.get("resource", {}).get("attributes", [])
        resource = {a.get("key"): a.get("value", {}).get("stringValue", "") for a in attrs}
        service = resource.get("service.name", "")
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                ids = (s.get("traceId", ""), s.get("spanId", ""))
                bytes.fromhex(ids[0]), bytes.fromhex(ids[1])  # raises unless hex
                if not isinstance(s.get("kind"), int):
                    raise ValueError("kind must be an integer in OTLP/JSON")
                yield {
                    "trace_id": ids[0],
                    "span_id": ids[1],
                    "parent": s.get("parentSpanId", ""),
                    "name": s.get("name", ""),
                    "kind": s["kind"],
                    "service": service,
                    "resource": resource,
                    "attributes": {
                        a.get("key"): a.get("value", {}).get("stringValue", "")
                        for a in s.get("attributes", [])
                    },
                }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", choices=["grpc", "http"], required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--cert", help="server certificate (PEM); TLS when given")
    ap.add_argument("--key", help="server key (PEM)")
    ap.add_argument("--client-ca", help="require a client certificate signed by this root (PEM)")
    ap.add_argument("--require-header", default="", help="NAME=VALUE every export must carry")
    ap.add_argument("--unavailable", type=int, default=0, help="fail this many exports first")
    ap.add_argument("--partial", type=int, default=0, help="reject this many spans of each export")
    args = ap.parse_args()
    need_name, _, need_value = args.require_header.partition("=")
    need_name = need_name.lower()

    def authorized(get):
        return not need_name or get(need_name) == need_value

    def partial():
        if args.partial:
            return trace_service_pb2.ExportTracePartialSuccess(
                rejected_spans=args.partial, error_message="test: spans too old"
            )
        return None

    host, _, port = args.listen.rpartition(":")
    if args.transport == "grpc":

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                n = next_export()
                md = dict(context.invocation_metadata())
                ok = authorized(md.get)
                emit({"export": {"n": n, "transport": "grpc", "authorized": ok}})
                if not ok:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong api key")
                if n <= args.unavailable:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
                for s in spans_of_proto(request):
                    emit(s)
                return trace_service_pb2.ExportTraceServiceResponse(partial_success=partial())

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
        if args.cert:
            with open(args.key, "rb") as k, open(args.cert, "rb") as c:
                pair = [(k.read(), c.read())]
            if args.client_ca:
                with open(args.client_ca, "rb") as ca:
                    creds = grpc.ssl_server_credentials(
                        pair, root_certificates=ca.read(), require_client_auth=True
                    )
            else:
                creds = grpc.ssl_server_credentials(pair)
            bound = server.add_secure_port(f"{host}:{port}", creds)
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
        server.start()
        print(f"listening on {host}:{bound}", flush=True)
        server.wait_for_termination()
        return

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            sys.stderr.write(fmt % a + "\n")

        def reply(self, code, body=b"", ctype="application/x-protobuf", headers=()):
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            n = next_export()
            ctype = self.headers.get("Content-Type", "")
            encoding = self.headers.get("Content-Encoding", "")
            ok = authorized(self.headers.get)
            emit(
                {
                    "export": {
                        "n": n,
                        "transport": "http",
                        "path": self.path,
                        "content_type": ctype,
                        "content_encoding": encoding,
                        "authorized": ok,
                    }
                }
            )
            if self.path != "/v1/traces":
                return self.reply(404)
            if not ok:
                return self.reply(401)
            if n <= args.unavailable:
                return self.reply(503, headers=[("Retry-After", "1")])
            if encoding == "gzip":
                body = gzip.decompress(body)
            json_body = ctype.startswith("application/json")
            try:
                if json_body:
                    spans = list(spans_of_json(json.loads(body)))
                else:
                    req = trace_service_pb2.ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    spans = list(spans_of_proto(req))
            except Exception as e:  # a malformed body is the client's error: 400, as a collector
                emit({"export": {"n": n, "error": str(e)}})
                return self.reply(400)
            for s in spans:
                emit(s)
            p = partial()
            if json_body:
                doc = {}
                if p is not None:
                    doc = {"partialSuccess": {"rejectedSpans": str(p.rejected_spans),
                                              "errorMessage": p.error_message}}
                return self.reply(200, json.dumps(doc).encode(), "application/json")
            resp = trace_service_pb2.ExportTraceServiceResponse(partial_success=p)
            return self.reply(200, resp.SerializeToString())

    server = ThreadingHTTPServer((host, int(port)), Handler)
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        if args.client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(args.client_ca)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"listening on {host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
