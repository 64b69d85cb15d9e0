#!/usr/bin/env python3
"""Turn one h2load run into the `WRK_JSON {...}` line bench/report.lua prints for wrk.

    h2load_json.py H2LOAD_OUTPUT REQUEST_LOG

H2LOAD_OUTPUT is what h2load printed; REQUEST_LOG is its --log-file (one request per
line, tab-separated: start time in microseconds since the epoch, HTTP status,
microseconds until the end of the response). Latency percentiles come from the log,
the rest from the summary. Standard library only.
"""

import json
import re
import sys


def main() -> int:
    text = open(sys.argv[1]).read()

    def grab(pattern: str, cast=float) -> float:
        m = re.search(pattern, text, re.MULTILINE)
        if not m:
            raise SystemExit(f"h2load_json: no match for {pattern!r} in h2load's output:\n{text}")
        return cast(m.group(1))

    duration_s = grab(r"^finished in ([\d.]+)s,")
    succeeded = grab(r"^requests: .* (\d+) succeeded,", int)
    failed = grab(r"^requests: .* (\d+) failed,", int)
    errored = grab(r"^requests: .* (\d+) errored,", int)
    timeout = grab(r"^requests: .* (\d+) timeout", int)
    status_4xx = grab(r"^status codes: .* (\d+) 4xx,", int)
    status_5xx = grab(r"^status codes: .* (\d+) 5xx", int)
    total_bytes = grab(r"^traffic: .*\((\d+)\) total", int)

    lat = []
    with open(sys.argv[2]) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1].startswith("2"):
                lat.append(int(parts[2]))
    lat.sort()

    def pct(p: float) -> int:
        return lat[min(len(lat) - 1, int(len(lat) * p / 100))] if lat else 0

    out = {
        "requests": succeeded,
        "duration_us": int(duration_s * 1e6),
        "bytes": total_bytes,
        "lat_mean_us": int(sum(lat) / len(lat)) if lat else 0,
        "lat_p50_us": pct(50), "lat_p90_us": pct(90), "lat_p99_us": pct(99),
        "lat_max_us": lat[-1] if lat else 0,
        # wrk's error kinds, as near as h2load's counts go.
        "err_connect": 0, "err_read": errored, "err_write": max(0, failed - errored - timeout),
        "err_status": status_4xx + status_5xx, "err_timeout": timeout,
    }
    print("WRK_JSON " + json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
