#!/usr/bin/env python3
"""Open many idle HTTP/1.1 keep-alive connections to one proxy and hold them.

Each connection sends one complete `GET /` and reads the whole response, then
stays open and idle. When all are open the script prints one line
`READY {json}` (so bench/run.sh can read the proxy's RSS), then waits for
SIGTERM/SIGINT (or --hold-max seconds, so it always ends by itself), prints
`DONE {json}` and closes everything.

Only meant for loopback targets. Standard library only.
"""

import argparse
import asyncio
import json
import resource
import signal
import ssl
import sys
import time


def raise_fd_limit(want: int) -> int:
    """Raise the soft fd limit as far as the hard limit allows; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Held(asyncio.Protocol):
    """A connection that gets one response and is then held idle: `done` resolves
    with the response's status; a close by the server after that is counted."""

    def __init__(self, stats: dict):
        self.stats = stats
        self.buf = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.transport = None
        self.status = None

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before response: {exc}"))
        else:
            # The server closed an idle connection we were still holding.
            self.stats["closed_by_server"] += 1


class Conn(Held):
    """One client connection: send a GET, read one response, then idle."""

    def __init__(self, request: bytes, stats: dict):
        super().__init__(stats)
        self.request = request

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        if self.done.done():
            # Nothing should arrive on an idle keep-alive connection.
            self.stats["unexpected_bytes"] += len(data)
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        body = self.buf[end + 4 :]
        try:
            self.status = int(head[0].split()[1])
        except (IndexError, ValueError):
            self.done.set_exception(ValueError(f"bad status line {head[0]!r}"))
            return
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            complete = len(body) >= int(headers["content-length"])
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            complete = body.endswith(b"0\r\n\r\n")
        else:
            complete = False  # close-delimited: not a keep-alive response
        if complete:
            if headers.get("connection", "").lower() == "close":
                self.done.set_exception(ValueError("server sent Connection: close"))
            else:
                self.done.set_result(self.status)
            self.buf = bytearray()


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


class H2Conn(Held):
    """One HTTP/2 connection (TLS, ALPN h2): the preface, one `GET /` on stream 1,
    its whole response, then idle. SETTINGS and PINGs are acknowledged."""

    DATA, HEADERS, SETTINGS, PING, GOAWAY = 0, 1, 4, 6, 7
    END_STREAM, ACK = 0x1, 0x1

    def __init__(self, authority: str, stats: dict):
        super().__init__(stats)
        self.authority = authority.encode()

    def connection_made(self, transport):
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            self.done.set_exception(ValueError("h2 not negotiated by ALPN"))
            return
        # :method GET, :scheme https, :path / (static table 2, 7, 4), :authority as a
        # literal with indexed name 1, not Huffman-coded.
        block = bytes([0x82, 0x87, 0x84, 0x41, len(self.authority)]) + self.authority
        transport.write(H2_PREFACE + h2_frame(self.SETTINGS, 0, 0)
                        + h2_frame(self.HEADERS, 0x4 | self.END_STREAM, 1, block))

    def data_received(self, data):
        self.buf += data
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                return
            kind, flags = self.buf[3], self.buf[4]
            stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFF_FFFF
            payload = bytes(self.buf[9:9 + n])
            del self.buf[:9 + n]
            self.frame(kind, flags, stream, payload)

    def frame(self, kind, flags, stream, payload):
        if kind == self.SETTINGS and not flags & self.ACK:
            self.transport.write(h2_frame(self.SETTINGS, self.ACK, 0))
        elif kind == self.PING and not flags & self.ACK:
            self.transport.write(h2_frame(self.PING, self.ACK, 0, payload))
        elif kind == self.GOAWAY:
            if not self.done.done():
                self.done.set_exception(ConnectionError("GOAWAY before the response"))
        elif stream == 1 and kind in (self.HEADERS, self.DATA):
            if kind == self.HEADERS and self.status is None:
                # Both servers send :status 200 as static table entry 8.
                self.status = 200 if payload[:1] == b"\x88" else -1
            if flags & self.END_STREAM and not self.done.done():
                self.done.set_result(self.status)
        elif self.done.done() and kind not in (self.SETTINGS, self.PING):
            self.stats["unexpected_bytes"] += 9 + len(payload)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=200,
                    help="connections being opened at once (bounds in-flight requests)")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-connection connect+response timeout")
    ap.add_argument("--tls", action="store_true",
                    help="connect over TLS (certificate not verified: loopback benchmarks only)")
    ap.add_argument("--h2", action="store_true",
                    help="HTTP/2 over TLS (ALPN h2) instead of HTTP/1.1; implies --tls")
    ap.add_argument("--hold-max", type=float, default=180.0,
                    help="exit by itself after holding this long (safety bound)")
    args = ap.parse_args()

    limit = raise_fd_limit(args.count + 1024)
    if limit < args.count + 64:
        print(f"idle_conns: fd limit {limit} is too low for {args.count} connections", file=sys.stderr)
        return 2

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    tls = None
    if args.tls or args.h2:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        tls.set_alpn_protocols(["h2" if args.h2 else "http/1.1"])

    request = (f"GET / HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
               "User-Agent: rampart-bench-idle\r\nAccept: */*\r\n\r\n").encode()
    stats = {"closed_by_server": 0, "unexpected_bytes": 0}
    authority = f"{args.host}:{args.port}"
    make = (lambda: H2Conn(authority, stats)) if args.h2 else (lambda: Conn(request, stats))
    errors: dict[str, int] = {}
    held: list[Conn] = []
    sem = asyncio.Semaphore(args.concurrency)

    async def open_one():
        async with sem:
            proto = None
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(make, args.host, args.port, ssl=tls),
                    args.timeout)
                status = await asyncio.wait_for(proto.done, args.timeout)
                if status != 200:
                    raise ValueError(f"status {status}")
                held.append(proto)
            except Exception as e:  # count every failure kind, keep going
                key = f"{type(e).__name__}: {e}"[:120]
                errors[key] = errors.get(key, 0) + 1
                if proto is not None and proto.transport is not None:
                    proto.transport.abort()

    t0 = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(args.count)))
    ready = {
        "requested": args.count,
        "ok": len(held),
        "failed": args.count - len(held),
        "errors": errors,
        "open_seconds": round(time.monotonic() - t0, 3),
        "fd_limit": limit,
    }
    print("READY " + json.dumps(ready), flush=True)

    try:
        await asyncio.wait_for(stop.wait(), args.hold_max)
    except asyncio.TimeoutError:
        pass
    done = dict(ready, held_seconds=round(time.monotonic() - t0 - ready["open_seconds"], 3), **stats)
    print("DONE " + json.dumps(done), flush=True)
    for proto in held:
        if proto.transport is not None:
            proto.transport.close()
    await asyncio.sleep(0.2)  # let the closes go out
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
