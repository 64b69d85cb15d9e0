#!/usr/bin/env python3
"""Turn the raw records of one bench/run.sh run into tables, CSV and JSON.

  report.py line RECORD_JSON   one progress line for one measured run
  report.py summary RUN_DIR    print the tables; write runs.csv, idle.csv and
                               summary.json into RUN_DIR

RUN_DIR holds meta.json, runs.jsonl (one record per measured wrk run) and
idle.jsonl (one record per proxy's idle-connection test), written by run.sh.
Standard library only.
"""

import csv
import json
import statistics
import sys
from pathlib import Path

BASELINE = "nginx"  # every ratio is "this proxy / nginx"
# nginx doing Rampart's default work (its log line's fields as JSON, the forwarding
# fields and request ids): a second CPU ratio.
SAME_WORK = "nginx-same"


def run_numbers(rec: dict) -> dict:
    """Derive the per-run figures from one raw runs.jsonl record."""
    w = rec["wrk"]
    secs = w["duration_us"] / 1e6
    cpu_s = rec["cpu_ticks"] / rec["clk_tck"]
    reqs = w["requests"]
    return {
        "proxy": rec["proxy"],
        "round": rec["round"],
        "requests": reqs,
        "seconds": round(secs, 3),
        "rps": round(reqs / secs, 1) if secs else 0.0,
        "p50_ms": w["lat_p50_us"] / 1000,
        "p99_ms": w["lat_p99_us"] / 1000,
        "max_ms": w["lat_max_us"] / 1000,
        "errors": sum(w[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")),
        "cpu_ticks": rec["cpu_ticks"],
        "cpu_s": round(cpu_s, 3),
        "cpu_us_per_req": round(cpu_s * 1e6 / reqs, 3) if reqs else None,
        # CPU use of the proxy during the run, in cores (1.0 = one core busy).
        "cpu_cores": round(cpu_s / secs, 3) if secs else None,
    }


def load_jsonl(path: Path) -> list:
    """The records of a JSON-lines file; [] if the file does not exist."""
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def throughput(runs: list, proxies: list) -> dict:
    """Per proxy, the median over rounds of each run figure, taken separately."""
    tput = {}
    for p in proxies:
        rs = [r for r in runs if r["proxy"] == p]
        if not rs:
            continue
        cpu = [r["cpu_us_per_req"] for r in rs if r["cpu_us_per_req"] is not None]
        tput[p] = {
            "rounds": len(rs),
            "rps": statistics.median(r["rps"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "cpu_us_per_req": statistics.median(cpu) if cpu else None,
            "cpu_us_per_req_min": min(cpu) if cpu else None,
            "cpu_us_per_req_max": max(cpu) if cpu else None,
            "cpu_cores": statistics.median(r["cpu_cores"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
        }
    return tput


def write_csv(path: Path, rows: list) -> None:
    """Write dict rows as CSV, the first row's keys as the header; nothing if no rows."""
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def ratio(value, base):
    if value is None or not base:
        return None
    return round(value / base, 2)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), line("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def summary(run_dir: Path) -> int:
    meta = json.loads((run_dir / "meta.json").read_text())
    runs = [run_numbers(rec) for rec in load_jsonl(run_dir / "runs.jsonl")]
    idle = load_jsonl(run_dir / "idle.jsonl")
    proxies = meta["proxies"]

    # Throughput/CPU: median over rounds of each figure, taken separately.
    tput = throughput(runs, proxies)
    base = tput.get(BASELINE, {})
    like = tput.get(SAME_WORK, {})
    for p, t in tput.items():
        t["cpu_ratio_vs_nginx"] = ratio(t["cpu_us_per_req"], base.get("cpu_us_per_req"))
        t["rps_ratio_vs_nginx"] = ratio(t["rps"], base.get("rps"))
        if like:
            t["cpu_ratio_vs_nginx_same"] = ratio(t["cpu_us_per_req"], like.get("cpu_us_per_req"))

    # Idle connections: RSS growth per held connection.
    mem = {}
    for rec in idle:
        ok = rec["client"].get("ok", 0)
        delta = rec["rss_after_kib"] - rec["rss_before_kib"]
        mem[rec["proxy"]] = {
            "conns_ok": ok,
            "conns_failed": rec["client"].get("failed"),
            "closed_by_server": rec.get("client_done", {}).get("closed_by_server"),
            "rss_before_kib": rec["rss_before_kib"],
            "rss_after_kib": rec["rss_after_kib"],
            "kib_per_conn": round(delta / ok, 3) if ok else None,
        }
    mbase = mem.get(BASELINE, {})
    for m in mem.values():
        m["ratio_vs_nginx"] = ratio(m["kib_per_conn"], mbase.get("kib_per_conn"))

    s = meta["settings"]
    over = ", clients over HTTPS (HTTP/1.1)" if s.get("tls") else ""
    if s.get("h2"):
        over = ", HTTP/2 over TLS (h2load -m 1 in wrk's place)"
    if s.get("close"):
        over += ", a new connection per request"
    if s.get("post_bytes"):
        over += f", every request a POST with a {s['post_bytes']}-byte body"
    print()
    print(f"Throughput and CPU  (wrk -t{s['threads']} -c{s['conns']} -d{s['duration']}, "
          f"median of {s['rounds']} round(s); proxy on CPU {s['proxy_cpu']}, wrk+origin on CPU {s['load_cpu']}; "
          f"access logs: {s['access_log']}{over})")
    rows = [[p, fmt(t["rps"], ",.0f"), fmt(t["p99_ms"], ".2f"),
             fmt(t["cpu_us_per_req"], ".2f"),
             f"{fmt(t['cpu_us_per_req_min'], '.2f')}..{fmt(t['cpu_us_per_req_max'], '.2f')}",
             fmt(t["cpu_cores"], ".2f"), fmt(t["cpu_ratio_vs_nginx"], ".2f")]
            + ([fmt(t["cpu_ratio_vs_nginx_same"], ".2f")] if like else []) + [t["errors"]]
            for p, t in tput.items()]
    if rows:
        print(table(["proxy", "req/s", "p99 ms", "CPU us/req", "(min..max)", "cores", "CPU ratio"]
                    + (["vs nginx-same"] if like else []) + ["errors"], rows))
    else:
        print("(no measured runs)")

    if mem:
        print()
        capped = ""
        if s.get("idle_conns_requested", s["idle_conns"]) != s["idle_conns"]:
            capped = f", capped from {s['idle_conns_requested']} by the fd limit {s['fd_limit']}"
        print(f"Memory with idle keep-alive connections  ({s['idle_conns']} opened per proxy{capped}{over}; "
              "RSS summed over the proxy's processes)")
        rows = [[p, m["conns_ok"], m["closed_by_server"] if m["closed_by_server"] is not None else "-",
                 fmt(m["rss_before_kib"] / 1024, ".1f"), fmt(m["rss_after_kib"] / 1024, ".1f"),
                 fmt(m["kib_per_conn"], ".2f"), fmt(m["ratio_vs_nginx"], ".2f")]
                for p, m in mem.items()]
        print(table(["proxy", "conns held", "closed early", "RSS before MiB", "RSS after MiB",
                     "KiB/conn", "ratio"], rows))
    print()
    print("Ratios are proxy / nginx (nginx = 1.00; lower is better for CPU and memory).")
    if like:
        print("vs nginx-same: CPU / that of nginx doing what Rampart does by default: the fields of")
        print("Rampart's log line as JSON (nginx's `combined` line is about a quarter as long),")
        print("X-Forwarded-*, Via and x-request-id added to requests and responses.")
    print("Only ratios within one run are meaningful: the machine is shared and noisy.")

    # Raw numbers for later comparison.
    write_csv(run_dir / "runs.csv", runs)
    write_csv(run_dir / "idle.csv", [{"proxy": p, **m} for p, m in mem.items()])
    (run_dir / "summary.json").write_text(json.dumps(
        {"meta": meta, "throughput": tput, "idle_memory": mem, "runs": runs, "idle_raw": idle},
        indent=2) + "\n")
    return 0


def main(argv) -> int:
    if len(argv) == 3 and argv[1] == "line":
        r = run_numbers(json.loads(argv[2]))
        print(f"  round {r['round']} {r['proxy']:<11} {r['rps']:>10,.0f} req/s  p99 {r['p99_ms']:7.2f} ms  "
              f"CPU {fmt(r['cpu_us_per_req'], '7.2f')} us/req ({r['cpu_cores']:.2f} cores)  errors {r['errors']}")
        return 0
    if len(argv) == 3 and argv[1] == "summary":
        return summary(Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
