#!/usr/bin/env python3
"""Client side of bench/failover.sh. Standard library only.

  failover_client.py load  --url URL --out CSV [--concurrency 20] [--duration 30] [--timeout 5]
      Closed-loop GET load over keep-alive connections (asyncio, raw sockets):
      CONCURRENCY workers, each with its own connection, each sending the next
      request as soon as the previous response is complete. Every request is
      one CSV row: start time (Unix epoch s), latency ms, worker, status
      (0 = no response), the backend that answered (X-Origin-Port),
      x-rampart-attempts, x-rampart-reason, and the error if there was no
      response. A worker whose connection fails opens a new one. Prints one
      JSON summary line, prefixed "LOAD_JSON ".

  failover_client.py watch --admin HOST:PORT --out JSONL [--interval 0.05] [--until-file F]
      Polls GET /admin/pools every INTERVAL s and writes one JSON line each
      time a backend's (healthy, active_check, circuit) or a pool's panic flag
      changes, with the poll's timestamp. Stops on SIGTERM/SIGINT.

  failover_client.py report RUN_DIR
      Reads events.jsonl (kills and restarts, from failover.sh), watch.jsonl
      and requests.csv; prints the tables and writes summary.json.
"""

import argparse
import asyncio
import csv
import json
import signal
import statistics
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from report import load_jsonl


# --- load -----------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.total = 0
        self.status = Counter()
        self.errors = Counter()
        self.connects = 0
        self.connect_errors = Counter()


async def one_request(reader, writer, req: bytes, timeout: float):
    """Send one GET and read the whole response. Returns (status, headers, keep_alive)."""
    writer.write(req)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"bad status line {lines[0][:60]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
            size = int(size_line.split(b";")[0].strip(), 16)
            await asyncio.wait_for(reader.readexactly(size + 2), timeout)  # data + CRLF
            if size == 0:
                break  # (no trailers expected)
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            await asyncio.wait_for(reader.readexactly(n), timeout)
    elif status not in (204, 304) and not (100 <= status < 200):
        raise ValueError("response without length")
    keep_alive = headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
    return status, headers, keep_alive


async def worker(wid, host, port, path, deadline, timeout, out, stats):
    req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: rampart-failover-client\r\n\r\n".encode()
    reader = writer = None
    while time.monotonic() < deadline:
        if writer is None:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                stats.connects += 1
            except (OSError, asyncio.TimeoutError) as e:
                kind = f"connect:{type(e).__name__}"
                stats.connect_errors[kind] += 1
                stats.errors[kind] += 1
                out.writerow([f"{time.time():.6f}", "", wid, 0, "", "", "", kind])
                await asyncio.sleep(0.05)
                continue
        t0, m0 = time.time(), time.monotonic()
        try:
            status, h, keep = await one_request(reader, writer, req, timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                asyncio.LimitOverrunError) as e:
            kind = f"request:{type(e).__name__}"
            stats.total += 1
            stats.errors[kind] += 1
            out.writerow([f"{t0:.6f}", f"{(time.monotonic() - m0) * 1000:.3f}", wid, 0, "", "", "", kind])
            writer.close()
            writer = None
            continue
        stats.total += 1
        stats.status[status] += 1
        out.writerow([f"{t0:.6f}", f"{(time.monotonic() - m0) * 1000:.3f}", wid, status,
                      h.get("x-origin-port", ""), h.get("x-rampart-attempts", ""),
                      h.get("x-rampart-reason", "") if status >= 300 else "", ""])
        if not keep:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def load(args) -> int:
    u = urlsplit(args.url)
    host, port, path = u.hostname, u.port or 80, u.path or "/"
    stats = Stats()
    with open(args.out, "w", newline="", buffering=1 << 20) as f:
        out = csv.writer(f)
        out.writerow(["t", "latency_ms", "worker", "status", "backend", "attempts", "reason", "error"])
        start = time.time()
        deadline = time.monotonic() + args.duration
        tasks = [asyncio.create_task(worker(i, host, port, path, deadline, args.timeout, out, stats))
                 for i in range(args.concurrency)]
        await asyncio.gather(*tasks)
        end = time.time()
    non2xx = sum(n for s, n in stats.status.items() if not 200 <= s < 300)
    print("LOAD_JSON " + json.dumps({
        "start": round(start, 6), "end": round(end, 6), "seconds": round(end - start, 3),
        "requests": stats.total, "rps": round(stats.total / (end - start), 1),
        "status": {str(k): v for k, v in sorted(stats.status.items())},
        "non_2xx": non2xx, "errors": dict(stats.errors), "connects": stats.connects,
        "connect_errors": dict(stats.connect_errors),
    }), flush=True)
    return 0


# --- watch ----------------------------------------------------------------------

def watch(args) -> int:
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    url = f"http://{args.admin}/admin/pools"
    last = {}
    polls = fails = 0
    next_t = time.monotonic()
    with open(args.out, "w", buffering=1) as f:
        while not stop:
            t = time.time()
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    doc = json.load(r)
                polls += 1
            except Exception as e:  # noqa: BLE001 - keep polling whatever happened
                fails += 1
                f.write(json.dumps({"t": round(t, 6), "poll_error": type(e).__name__}) + "\n")
                doc = None
            if doc is not None:
                for p in doc["pools"]:
                    key = ("pool", p["name"])
                    if last.get(key) != p.get("panic"):
                        last[key] = p.get("panic")
                        f.write(json.dumps({"t": round(t, 6), "pool": p["name"], "panic": p.get("panic")}) + "\n")
                    for b in p["backends"]:
                        state = (b["healthy"], b["active_check"], b["circuit"], b.get("state"))
                        key = ("backend", p["name"], b["url"])
                        if last.get(key) != state:
                            last[key] = state
                            f.write(json.dumps({"t": round(t, 6), "pool": p["name"], "backend": b["url"],
                                                "healthy": b["healthy"], "active_check": b["active_check"],
                                                "circuit": b["circuit"], "state": b.get("state")}) + "\n")
            next_t += args.interval
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()  # fell behind; do not burst
        f.write(json.dumps({"t": round(time.time(), 6), "polls": polls, "poll_errors": fails}) + "\n")
    return 0


# --- report ---------------------------------------------------------------------

def first_match(watch_rows, backend, t0, pred, t_limit):
    """Time of the first poll at or after t0 (and before t_limit) whose state of
    backend satisfies pred, with that state; (t0, state) if the state in force at
    t0 (the last change logged before it) already does; (None, None) if never.
    The watcher logs changes only, so this is exact to one poll interval."""
    state = None
    for r in watch_rows:
        if r.get("backend") != backend:
            continue
        if r["t"] < t0:
            state = r
            continue
        if state is not None and pred(state):
            return t0, state
        if r["t"] >= t_limit:
            return None, None
        if pred(r):
            return r["t"], r
        state = r
    if state is not None and pred(state):
        return t0, state
    return None, None


def mmm(xs):
    if not xs:
        return "-"
    return f"min {min(xs):.0f} / median {statistics.median(xs):.0f} / max {max(xs):.0f} ms"


def report(args) -> int:
    run_dir = Path(args.run_dir)
    meta = json.loads((run_dir / "meta.json").read_text())
    events = load_jsonl(run_dir / "events.jsonl")
    watch = load_jsonl(run_dir / "watch.jsonl")
    watch_rows = [r for r in watch if "backend" in r]
    panic_rows = [r for r in watch if "panic" in r]
    watch_tail = [r for r in watch if "polls" in r]
    load_sum = json.loads((run_dir / "load.json").read_text()) if (run_dir / "load.json").exists() else {}
    end = json.loads((run_dir / "end.json").read_text()) if (run_dir / "end.json").exists() else {}
    s = meta["settings"]

    # Requests, from the raw CSV (the client's own summary is cross-checked).
    rows = []
    with open(run_dir / "requests.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows.append(r)
    answered = [r for r in rows if r["status"] != "0"]
    status = Counter(r["status"] for r in answered)
    non2xx = [r for r in answered if not r["status"].startswith("2")]
    req_errors = Counter(r["error"] for r in rows if r["error"].startswith("request:"))
    conn_errors = Counter(r["error"] for r in rows if r["error"].startswith("connect:"))
    by_backend = Counter(r["backend"] for r in answered if r["backend"])
    retried = Counter(r["attempts"] for r in answered if r["attempts"] and "," in r["attempts"])
    t0 = next((e["t"] for e in events if e["event"] == "load_start"), None) \
        or load_sum.get("start") or (float(rows[0]["t"]) if rows else 0.0)

    print()
    print(f"Failover  (Rampart, 3 backends, balance={s['balance']}, health every {s['health_interval']} "
          f"(up {s['consecutive_up']}, down {s['consecutive_down']}), outlier {s['outlier_failures']} failures / "
          f"ejection {s['ejection_time']}, retries={s['retries']}; {s['concurrency']} keep-alive clients, "
          f"{s['duration']}; a backend SIGKILLed every {s['kill_every']}, down {s['down_for']}, victim {s['victim']})")
    total = len(rows) - sum(conn_errors.values())
    print(table_kv([
        ("requests sent", f"{total:,}"),
        ("  answered", f"{len(answered):,}  ({load_sum.get('rps', 0):,.0f} req/s)"),
        ("  by status", ", ".join(f"{k}: {v:,}" for k, v in sorted(status.items())) or "-"),
        ("non-2xx responses", f"{len(non2xx):,}  (target 0)"),
        ("requests without a response", f"{sum(req_errors.values()):,}  "
                                        f"{dict(req_errors) if req_errors else ''}".rstrip()),
        ("client connect errors", f"{sum(conn_errors.values()):,}  {dict(conn_errors) if conn_errors else ''}".rstrip()),
        ("client connections opened", f"{load_sum.get('connects', '-')}"),
        ("2xx that needed a retry", f"{sum(retried.values()):,}  (x-rampart-attempts with more than one try)"),
        ("rampart_upstream_retries_total", end.get("retries_total", "-")),
        ("rampart_upstream_errors_total", end.get("upstream_errors", "-")),
        ("health transitions (metrics)", end.get("transitions", "-")),
        ("rampart_pool_panic_requests_total", end.get("panic_requests", "-")),
        ("answered by backend", ", ".join(f"{k}: {v:,}" for k, v in sorted(by_backend.items())) or "-"),
        ("watcher polls", f"{watch_tail[-1]['polls']} ({watch_tail[-1]['poll_errors']} failed)" if watch_tail else "-"),
    ]))

    if non2xx or req_errors:
        print()
        print("First non-2xx responses / failed requests (t = seconds since load start):")
        bad = [r for r in rows if r["status"] != "0" and not r["status"].startswith("2")
               or r["error"].startswith("request:")]
        for r in bad[:12]:
            print(f"  t={float(r['t']) - t0:8.3f}  status {r['status'] if r['status'] != '0' else '-'}  "
                  f"reason {r['reason'] or '-'}  attempts {r['attempts'] or '-'}  {r['error']}".rstrip())
        by_reason = Counter((r["status"], r["reason"]) for r in non2xx)
        if by_reason:
            print("  non-2xx by (status, x-rampart-reason): "
                  + ", ".join(f"{k[0]} {k[1] or '-'}: {v}" for k, v in by_reason.most_common()))

    # Detection times. For a kill: until healthy turns false (the headline
    # figure), until the active check reports failing, until the circuit opens
    # (passive ejection). For a restart: until healthy, active check passing,
    # circuit closed again.
    checks = {
        "kill": [("healthy", lambda st: not st["healthy"]),
                 ("active", lambda st: st["active_check"] == "failing"),
                 ("circuit", lambda st: st["circuit"] == "open")],
        "start": [("healthy", lambda st: st["healthy"]),
                  ("active", lambda st: st["active_check"] == "passing"),
                  ("circuit", lambda st: st["circuit"] == "closed")],
    }
    det = {(ev, name): [] for ev in checks for name, _ in checks[ev]}
    trows = []
    for e in events:
        if e["event"] not in checks:
            continue
        # Until the next kill/restart of the same backend.
        later = [x["t"] for x in events if x["t"] > e["t"] and x["backend"] == e["backend"]
                 and x["event"] in checks]
        limit = min(later) if later else float("inf")
        cells = [f"{e['t'] - t0:.2f}", "kill" if e["event"] == "kill" else "restart", e["backend"].rsplit(":", 1)[-1]]
        for name, pred in checks[e["event"]]:
            t, st = first_match(watch_rows, e["backend"], e["t"], pred, limit)
            ms = None if t is None else (t - e["t"]) * 1000
            det[(e["event"], name)].append(ms)  # 0 = already in that state (nothing to time)
            cell = "not seen" if ms is None else f"{ms:,.0f}"
            if ms == 0:
                cell = "0 (already)"  # e.g. a circuit that never opened is still closed at the restart
            if name == "healthy" and st is not None:
                cell += f" ({st['active_check']}/{st['circuit']})"
            cells.append(cell)
        trows.append(cells)
    print()
    print(f"Detection in ms (Rampart /admin/pools polled every {s['poll_interval']} s, so +-1 poll; "
          "t = seconds since the load started)")
    if trows:
        print(table(["t", "event", "backend", "healthy flips (active/circuit then)", "active check", "circuit"],
                    trows))
    else:
        print("  (no kills: DURATION too short for KILL_EVERY + DOWN_FOR)")
    print()
    timed = lambda xs: [x for x in xs if x]  # leave out "not seen" (None) and "already" (0)
    for ev, label in (("kill", "kill -> unhealthy"), ("start", "restart -> healthy")):
        xs = det[(ev, "healthy")]
        already, missed = xs.count(0), xs.count(None)
        note = f"{len(timed(xs))} of {len(xs)} timed" + (f", {already} already so" if already else "") \
            + (f", {missed} not seen before the next kill/restart" if missed else "")
        extra = "; ".join(f"{n} {mmm(timed(det[(ev, n)])).replace(' / ', '/')}" for n in ("active", "circuit"))
        print(f"  {label:<19} {mmm(timed(xs))}  ({note})")
        print(f"  {'':<19} by layer: {extra}")
    panics = [r for r in panic_rows if r.get("panic")]
    if panics:
        print(f"  the pool entered panic mode {len(panics)} time(s) (too few healthy backends: "
              f"requests spread over all of them), first at t={panics[0]['t'] - t0:.2f}")

    (run_dir / "summary.json").write_text(json.dumps({
        "meta": meta, "load": load_sum,
        "requests": {"sent": total, "answered": len(answered), "status": dict(status),
                     "non_2xx": len(non2xx), "request_errors": dict(req_errors),
                     "connect_errors": dict(conn_errors), "retried_2xx": sum(retried.values())},
        "detection_ms": {f"{'kill' if ev == 'kill' else 'restart'}_{name}": xs for (ev, name), xs in det.items()},
        "panic_entries": len(panics), "end": end,
    }, indent=2) + "\n")
    return 0


def table_kv(pairs):
    w = max(len(k) for k, _ in pairs)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in pairs)


def table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  " + "  ".join(str(c).rjust(w) if i != 1 else str(c).ljust(w)
                                          for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line("-" * w for w in widths)] + [line(r) for r in rows])


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("load")
    a.add_argument("--url", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--concurrency", type=int, default=20)
    a.add_argument("--duration", type=float, default=30.0)
    a.add_argument("--timeout", type=float, default=5.0)
    w = sub.add_parser("watch")
    w.add_argument("--admin", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--interval", type=float, default=0.05)
    r = sub.add_parser("report")
    r.add_argument("run_dir")
    args = ap.parse_args(argv[1:])
    if args.cmd == "load":
        return asyncio.run(load(args))
    if args.cmd == "watch":
        return watch(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
