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


class Conn(asyncio.Protocol):
    """One client connection: send a GET, read one response, then idle."""

    def __init__(self, request: bytes, stats: dict):
        self.request = request
        self.stats = stats
        self.buf = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.transport = None
        self.status = None

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

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before response: {exc}"))
        else:
            # The server closed an idle connection we were still holding.
            self.stats["closed_by_server"] += 1


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
    if args.tls:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        tls.set_alpn_protocols(["http/1.1"])

    request = (f"GET / HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
               "User-Agent: rampart-bench-idle\r\nAccept: */*\r\n\r\n").encode()
    stats = {"closed_by_server": 0, "unexpected_bytes": 0}
    errors: dict[str, int] = {}
    held: list[Conn] = []
    sem = asyncio.Semaphore(args.concurrency)

    async def open_one():
        async with sem:
            proto = None
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: Conn(request, stats), args.host, args.port, ssl=tls),
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
