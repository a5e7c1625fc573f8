#!/usr/bin/env python3
"""Load clients of the soak (tests/tests/soak.rs), one subcommand per kind of load.

Every client runs `--workers` threads until `--duration` seconds have passed or `--max`
exchanges are done (both bounds always apply). A worker opens a connection, does up to
`--per-conn` exchanges on it (a pause of `--pause-ms` between them), closes it and opens
the next. Each exchange is checked exactly (status and body, echoed bytes, the value read
back) and printed as one line:

    rec <conn_start_ms> <start_ms> <end_ms> <first> <outcome> <endpoint> <bytes> <detail>

`first` is 1 for the connection's first exchange (its connect included), `outcome` is
`ok`, `fail`, `corrupt` (bytes came back different: `bytes` is how many differ) or
`retried` (a reused keep-alive connection the server had closed before answering, as
HTTP/1.1 lets it, or an HTTP/2 request that a GOAWAY turned away; the request went again
on a new connection, which has its own line).
`endpoint` is the backend host index (0, 1, 2) when the answer names it, else `-`.
Timestamps are milliseconds since the Unix epoch, the clock of the test's events."""

import argparse
import os
import select
import signal
import socket
import sys
import threading
import time


def now_ms():
    return int(time.time() * 1000)


def host_port(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def host_index(addr):
    """10.10.i.2 -> i (the soak's backend hosts)."""
    parts = addr.split(":")[0].split(".")
    return parts[2] if len(parts) == 4 and parts[:2] == ["10", "10"] else "-"


OUT = threading.Lock()


class Worker:
    """Runs sessions of `per_conn` exchanges; subclasses open, exchange and close."""

    def __init__(self, args, index, budget):
        self.args, self.index, self.budget = args, index, budget
        self.deadline = time.monotonic() + args.duration

    def running(self):
        return time.monotonic() < self.deadline and self.budget.take()

    def emit(self, first, start, outcome, endpoint="-", nbytes=0, detail=""):
        detail = " ".join(str(detail).split())[:200] or "-"
        line = f"rec {self.conn_start} {start} {now_ms()} {int(first)} {outcome} {endpoint} {nbytes} {detail}"
        with OUT:
            print(line, flush=True)

    def run(self):
        while self.running():
            self.conn_start, self.endpoint = now_ms(), "-"
            try:
                self.open()
            except Exception as e:  # noqa: BLE001 - every failure is a result here
                self.emit(True, self.conn_start, "fail", detail=f"connect: {e!r}")
                self.close()
                time.sleep(self.args.pause_ms / 1000)
                continue
            first, n = True, 0
            while True:
                start = now_ms()
                try:
                    outcome, endpoint, nbytes, detail = self.exchange(n)
                except Exception as e:  # noqa: BLE001
                    outcome, endpoint, nbytes, detail = "fail", self.endpoint, 0, repr(e)
                self.emit(first, start, outcome, endpoint, nbytes, detail)
                first, n = False, n + 1
                if outcome != "ok" or self.closing() or n >= self.args.per_conn or not self.running():
                    break
                time.sleep(self.args.pause_ms / 1000)
            self.close()

    def closing(self):
        return False

    def close(self):
        s = getattr(self, "sock", None)
        if s is not None:
            try:
                s.close()
            except OSError:
                pass
        self.sock = None


class Budget:
    """The `--max` bound, shared by the workers of one client."""

    def __init__(self, n):
        self.n, self.lock = n, threading.Lock()

    def take(self):
        with self.lock:
            self.n -= 1
            return self.n >= 0

    def end(self):
        """No exchange after those under way (SIGTERM: every line printed is whole)."""
        self.n = 0


def connect(target):
    s = socket.create_connection(host_port(target), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_exact(reader, n):
    """`n` bytes from a buffered reader, whose `read(n)` returns what came before EOF:
    fewer is a cut connection (the soak puts it down to its cause by time), never bytes
    to compare."""
    data = reader.read(n)
    if len(data) < n:
        raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
    return data


class Bulk(Worker):
    """A stream through the probe echo server: greeting, then `--bytes` random bytes sent
    in 64 KiB chunks while the echo is read and compared, half-close, EOF."""

    def open(self):
        self.sock = connect(self.args.target)
        self.reader = self.sock.makefile("rb")
        hello = self.reader.readline().decode()
        if not hello.startswith("HELLO "):
            raise ConnectionError(f"no greeting: {hello!r}")
        self.endpoint = host_index(hello.split()[1])

    def exchange(self, n):
        data = os.urandom(self.args.bytes)
        sock, sent_error = self.sock, []

        def send():
            # This connection's socket, never a later one's: a sender outliving its
            # stream would write into the next connection.
            try:
                for off in range(0, len(data), 65536):
                    sock.sendall(data[off : off + 65536])
                    time.sleep(self.args.chunk_delay_ms / 1000)
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                sent_error.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got, differ = 0, 0
        try:
            while True:
                chunk = self.reader.read1(65536)
                if not chunk:
                    break
                want = data[got : got + len(chunk)]
                if chunk != want:
                    differ += sum(a != b for a, b in zip(chunk, want)) + max(0, len(chunk) - len(want))
                got += len(chunk)
        finally:
            if sender.is_alive():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            sender.join(30)
        if differ:
            return "corrupt", self.endpoint, differ, f"{differ} of {got} bytes differ"
        if sent_error:
            return "fail", self.endpoint, got, f"send: {sent_error[0]!r}"
        if got != len(data):
            return "fail", self.endpoint, got, f"echo ended after {got} of {len(data)} bytes"
        return "ok", self.endpoint, got, ""

    def closing(self):
        return True  # one stream per connection: the half-close ends it


class Redis(Worker):
    """SET then GET of a fresh key and random value per exchange, on one connection; the
    connection's endpoint from CLIENT INFO (laddr)."""

    def open(self):
        self.sock = connect(self.args.target)
        self.reader = self.sock.makefile("rb")
        info = self.command(b"CLIENT", b"INFO")
        laddr = [f for f in info.decode().split() if f.startswith("laddr=")]
        self.endpoint = host_index(laddr[0][6:]) if laddr else "-"

    def command(self, *parts):
        out = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sock.sendall(out)
        line = self.reader.readline()
        if not line:
            raise ConnectionError("EOF before a reply")
        if line[:1] == b"$":
            n = int(line[1:])
            return None if n < 0 else recv_line_body(self.reader, n)
        if line[:1] == b"-":
            raise RuntimeError(line.decode().strip())
        return line[1:].strip()

    def exchange(self, n):
        key = b"soak:%d:%d:%d" % (os.getpid(), self.index, now_ms() * 1000 + n)
        value = os.urandom(16 + (n * 97) % 1000).hex().encode()
        if self.command(b"SET", key, value, b"EX", b"60") != b"OK":
            return "fail", self.endpoint, 0, "SET did not answer OK"
        back = self.command(b"GET", key)
        if back is None:
            return "fail", self.endpoint, 0, "GET found no value"
        if back != value:
            differ = sum(a != b for a, b in zip(back, value)) + abs(len(back) - len(value))
            return "corrupt", self.endpoint, differ, "GET read back another value"
        return "ok", self.endpoint, len(value), ""


def recv_line_body(reader, n):
    return read_exact(reader, n + 2)[:n]


class Http1(Worker):
    """Keep-alive GETs: `/who` (answers `host-<i>`) and, every fourth, `/blob` (a file whose
    bytes the client knows)."""

    def open(self):
        self.sock = connect(self.args.target)
        self.reader = self.sock.makefile("rb")
        self.reused, self.will_close = False, False

    def request(self, path):
        host = self.args.target
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: soak\r\n\r\n".encode())
        status = self.reader.readline()
        if not status:
            raise EOFError("closed before answering")
        headers = {}
        while (line := self.reader.readline()) != b"\r\n":
            # EOF inside the head: a cut, as one inside the body is (`read_exact`).
            if not line.endswith(b"\n"):
                raise ConnectionError("EOF inside the response head")
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = read_exact(self.reader, int(headers.get("content-length", "0")))
        self.will_close = headers.get("connection", "").lower() == "close"
        return int(status.split()[1]), body

    def exchange(self, n):
        path = "/blob" if n % 4 == 3 else "/who"
        if self.reused and closed_while_idle(self.sock):
            # What connection pools check before reusing one (urllib3's
            # is_connection_dropped): the server closed it while it sat idle.
            self.emit(False, now_ms(), "retried", detail="closed while idle")
            self.close()
            self.conn_start = now_ms()
            self.open()
        try:
            code, body = self.request(path)
        except (EOFError, ConnectionResetError, BrokenPipeError) as e:
            if not self.reused:
                raise
            # The server closed the idle connection as the request went (HTTP/1.1
            # allows it; clients retry an idempotent request on a new connection).
            self.emit(False, now_ms(), "retried", detail=repr(e))
            self.close()
            self.conn_start = now_ms()
            self.open()
            code, body = self.request(path)
        self.reused = True
        return check_http(code, body, path, self.args.blob)

    def closing(self):
        return self.will_close


def closed_while_idle(sock):
    """Whether the peer closed an idle connection: readable, and nothing but EOF to read."""
    r, _, _ = select.select([sock], [], [], 0)
    if not r:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def check_http(code, body, path, blob):
    if code != 200:
        return "fail", "-", 0, f"status {code}: {body[:80]!r}"
    if path == "/blob":
        if body != blob:
            differ = sum(a != b for a, b in zip(body, blob)) + abs(len(body) - len(blob))
            return "corrupt", "-", differ, f"/blob: {differ} bytes differ"
        return "ok", "-", len(body), ""
    text = body.decode(errors="replace").strip()
    if not text.startswith("host-") or text[5:] not in ("0", "1", "2"):
        return "corrupt", "-", len(body), f"/who answered {text!r}"
    return "ok", text[5:], len(body), ""


def h2_graceful_goaway():
    """python-h2 treats the first GOAWAY as the end of everything and refuses every later
    frame (python-hyper/h2 raises "Invalid input RECV_PING in state CLOSED"), while RFC
    9113 section 6.8 has streams up to the GOAWAY's last stream id complete, and a
    graceful shutdown (hyper's, nginx's) sends GOAWAY, a PING, then the final GOAWAY. Let
    a closed connection keep receiving frames, as nghttp2, Go and grpc clients do; the
    worker opens no new stream on it. (h2 4.4.1, the version xtask/src/bootstrap.rs pins.)"""
    from h2.connection import ConnectionInputs as I, ConnectionState as S, H2ConnectionStateMachine as M

    for i in [I.RECV_HEADERS, I.RECV_DATA, I.RECV_WINDOW_UPDATE, I.RECV_PING, I.RECV_SETTINGS,
              I.RECV_RST_STREAM, I.RECV_PRIORITY, I.SEND_WINDOW_UPDATE, I.SEND_PING, I.SEND_SETTINGS,
              I.SEND_RST_STREAM]:
        M._transitions.setdefault((S.CLOSED, i), (None, S.CLOSED))


class H2(Worker):
    """HTTP/2 with prior knowledge (h2c), one stream at a time on one connection, with the
    h2 package; a GOAWAY ends the connection after its last stream, as clients do."""

    def open(self):
        import h2.config
        import h2.connection

        h2_graceful_goaway()
        self.sock = connect(self.args.target)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.h2.initiate_connection()
        self.sock.sendall(self.h2.data_to_send())
        self.goaway, self.eof = None, False

    def pump(self):
        """Take in, without blocking, what the server sent since the last response (PINGs
        to answer, a GOAWAY)."""
        import h2.events

        while select.select([self.sock], [], [], 0)[0]:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.eof = True
                return
            for ev in self.h2.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway = ev.last_stream_id
            try:
                self.sock.sendall(self.h2.data_to_send())
            except OSError:
                self.eof = True
                return

    def reconnect(self, why):
        self.emit(False, now_ms(), "retried", detail=why)
        self.close()
        self.conn_start = now_ms()
        self.open()

    def exchange(self, n):
        self.pump()
        if self.goaway is not None or self.eof:
            # The server said, while the connection sat idle, that it takes no new
            # streams (or closed it): a new connection, as an always-reading client would.
            self.reconnect("GOAWAY or close while idle")
        try:
            return self.request(n)
        except (OSError, ConnectionError) as e:
            if self.goaway is None or self.answered:
                raise
            # A GOAWAY came while this request was on its way: the server took no stream
            # past the GOAWAY's last stream id, and it closes once it has answered those
            # (RFC 9113 6.8). A GET it never began to answer is sent again on a new
            # connection, as Go's, nghttp2's and grpc's clients do with a request a GOAWAY
            # turned away. A response cut short stays a failure.
            self.reconnect(f"GOAWAY, then {e!r}")
            return self.request(n)

    def request(self, n):
        import h2.events

        path = "/blob" if n % 4 == 3 else "/who"
        sid = self.h2.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", self.args.target)]
        self.answered = False
        self.h2.send_headers(sid, headers, end_stream=True)
        self.sock.sendall(self.h2.data_to_send())
        code, body, ended = None, bytearray(), False
        while not ended:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"EOF on stream {sid}")
            # Every event of the read, also those after the stream's end: a GOAWAY read
            # together with the last DATA still means no new stream on this connection.
            for ev in self.h2.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    code = int(dict(ev.headers)[":status"])
                    self.answered = True
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise ConnectionError(f"stream {sid} reset: {ev.error_code}")
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway = ev.last_stream_id
                    if ev.last_stream_id is not None and ev.last_stream_id < sid:
                        raise ConnectionError(f"GOAWAY before stream {sid} was taken")
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    ended = True
            # The acknowledgements (WINDOW_UPDATE), also after the last DATA: a server
            # that closes with them unread resets the connection and this write fails
            # though the response came whole. That stays a failure, as it is for client
            # libraries that acknowledge as they read (the agent lingers; see
            # agent/src/proxy/linger.rs).
            self.sock.sendall(self.h2.data_to_send())
        return check_http(code, bytes(body), path, self.args.blob)

    def closing(self):
        return self.goaway is not None


class Grpc(Worker):
    """Unary calls on one channel to backends.py grpc-server, which answers `h<i>:<request>`."""

    def open(self):
        import grpc

        self.grpc = grpc
        # A channel of its own subchannels: one channel is one connection, and a new one
        # really connects (by default grpc shares subchannels, and the last one's failure
        # and reconnect back-off, between the channels of a process).
        self.channel = grpc.insecure_channel(self.args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.who = self.channel.unary_unary("/test.Echo/Who")

    def exchange(self, n):
        payload = os.urandom(32).hex().encode()
        try:
            reply = self.who(payload, timeout=10)
        except self.grpc.RpcError as e:
            return "fail", "-", 0, f"{e.code().name} {e.details()}"
        server, _, echoed = reply.partition(b":")
        if echoed != payload:
            return "corrupt", "-", len(payload), "reply does not carry the request"
        return "ok", server.decode()[1:], len(payload), ""

    def close(self):
        ch = getattr(self, "channel", None)
        if ch is not None:
            ch.close()
        self.channel = None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["bulk", "redis", "http1", "h2", "grpc"])
    p.add_argument("--target", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--max", type=int, default=100000)
    p.add_argument("--per-conn", type=int, default=20)
    p.add_argument("--pause-ms", type=int, default=20)
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--chunk-delay-ms", type=int, default=10)
    p.add_argument("--blob", help="the file nginx serves as /blob")
    args = p.parse_args()
    args.blob = open(args.blob, "rb").read() if args.blob else b""
    kind = {"bulk": Bulk, "redis": Redis, "http1": Http1, "h2": H2, "grpc": Grpc}[args.kind]
    budget = Budget(args.max)
    signal.signal(signal.SIGTERM, lambda *_: budget.end())
    threads = [threading.Thread(target=kind(args, i, budget).run, daemon=True) for i in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + 60)
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
