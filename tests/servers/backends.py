#!/usr/bin/env python3
"""Real servers and clients for the HTTP end-to-end tests (tests/tests/http.rs), one
subcommand each. gRPC uses grpcio with raw-bytes methods, so no generated code is needed;
WebSockets use the `websockets` package. Every server runs until killed; every client is
bounded and prints what it saw, one `key=value` per line."""

import argparse
import hashlib
import http.server
import socket
import socketserver
import sys
import threading
import time
from concurrent import futures


def host_port(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def grpc_server(args):
    import grpc

    calls = {"n": 0}
    lock = threading.Lock()

    def who(request, context):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if args.unavailable_every and n % args.unavailable_every == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "shedding load")
        return args.id.encode() + b":" + request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(args.listen)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def grpc_client(args):
    import grpc

    counts, failures = {}, 0
    with grpc.insecure_channel(args.target) as channel:
        who = channel.unary_unary("/test.Echo/Who")
        for i in range(args.calls):
            try:
                reply = who(b"call%d" % i, timeout=10)
                server = reply.split(b":")[0].decode()
                counts[server] = counts.get(server, 0) + 1
            except grpc.RpcError as e:
                failures += 1
                print(f"error={e.code().name} {e.details()}")
    for server, n in sorted(counts.items()):
        print(f"server.{server}={n}")
    print(f"failures={failures}")


def ws_echo(args):
    from websockets.sync.server import serve

    def echo(ws):
        for message in ws:
            ws.send(message)

    host, port = host_port(args.listen)
    with serve(echo, host, port, max_size=None) as server:
        print("ready", flush=True)
        server.serve_forever()


def ws_client(args):
    from websockets.sync.client import connect

    ok, largest = 0, 0
    n = max(args.messages, 2)
    with connect(args.uri, max_size=None, open_timeout=10) as ws:
        for i in range(n):
            # Sizes from 1 byte to exactly --max-size, growing geometrically, the last
            # ones at the top; text (hex) and binary in turn, each exactly `size` long.
            size = 1 if i == 0 else round(args.max_size ** (i / (n - 1)))
            base = bytes((i + j) % 251 for j in range(min(size, 251 * 16)))
            payload = (base * (size // len(base) + 1))[:size]
            message = payload.hex()[:size] if i % 2 == 0 else payload
            ws.send(message)
            back = ws.recv(timeout=10)
            if back == message:
                ok += 1
                largest = max(largest, len(message))
    print(f"echoed={ok}")
    print(f"largest={largest}")


class UploadHandler(http.server.BaseHTTPRequestHandler):
    """POST: answers the sha256 of the body; HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        digest = hashlib.sha256()
        left = int(self.headers.get("Content-Length", "0"))
        while left:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        body = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class Threaded(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def upload(args):
    server = Threaded(host_port(args.listen), UploadHandler)
    print("ready", flush=True)
    server.serve_forever()


class GoldenHandler(http.server.BaseHTTPRequestHandler):
    """GET /ok: 200; /fail: 500; /slow: 200 after 200 ms. Known answers and latency, for
    the golden-signal tests. HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        status = {"/ok": 200, "/fail": 500, "/slow": 200}.get(self.path, 404)
        if self.path == "/slow":
            time.sleep(0.2)
        body = b"%d %s\n" % (status, self.path.encode())
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def golden(args):
    server = Threaded(host_port(args.listen), GoldenHandler)
    print("ready", flush=True)
    server.serve_forever()


def hang(args):
    """Accepts connections and reads requests but never answers: a hung backend."""
    sock = socket.create_server(host_port(args.listen), reuse_port=True)
    held = []
    print("ready", flush=True)
    while True:
        conn, _ = sock.accept()
        held.append(conn)


def greeter(args):
    """Server speaks first (SMTP style): a banner on accept, then echoes lines."""
    sock = socket.create_server(host_port(args.listen), reuse_port=True)
    print("ready", flush=True)

    def serve(conn):
        with conn:
            conn.sendall(args.banner.encode() + b"\r\n")
            while data := conn.recv(4096):
                conn.sendall(data)

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def greeter_client(args):
    """Connects, waits for the banner without sending anything, reports how long it took."""
    host, port = host_port(args.connect)
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=15) as s:
        banner = s.recv(4096).decode().strip()
        waited = time.monotonic() - t0
        s.sendall(b"QUIT\r\n")
        echoed = s.recv(4096).decode().strip()
    print(f"banner={banner}\nwaited_ms={int(waited * 1000)}\necho={echoed}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("grpc-server")
    s.add_argument("--listen", required=True)
    s.add_argument("--id", required=True)
    s.add_argument("--unavailable-every", type=int, default=0)
    s = sub.add_parser("grpc-client")
    s.add_argument("--target", required=True)
    s.add_argument("--calls", type=int, default=60)
    s = sub.add_parser("ws-echo")
    s.add_argument("--listen", required=True)
    s = sub.add_parser("ws-client")
    s.add_argument("--uri", required=True)
    s.add_argument("--messages", type=int, default=40)
    s.add_argument("--max-size", type=int, default=1 << 20)
    for name in ("upload", "hang", "golden"):
        sub.add_parser(name).add_argument("--listen", required=True)
    s = sub.add_parser("greeter")
    s.add_argument("--listen", required=True)
    s.add_argument("--banner", default="220 greeter ready")
    sub.add_parser("greeter-client").add_argument("--connect", required=True)
    args = p.parse_args()
    {
        "grpc-server": grpc_server,
        "grpc-client": grpc_client,
        "ws-echo": ws_echo,
        "ws-client": ws_client,
        "upload": upload,
        "hang": hang,
        "golden": golden,
        "greeter": greeter,
        "greeter-client": greeter_client,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
