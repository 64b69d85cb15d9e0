#!/usr/bin/env python3
"""Tables for one bench/pool.sh run.

  pool_report.py RUN_DIR   print the table; write runs.csv and summary.json into RUN_DIR

RUN_DIR holds meta.json and runs.jsonl (one record per measured wrk run, the
same format as run.sh's). Every figure is the median over rounds; ratios are
taken against rampart-plain (Rampart's one-backend proxy, run.sh's config) and
against nginx-pool. Standard library only.
"""

import json
import sys
from pathlib import Path

from report import fmt, load_jsonl, ratio, run_numbers, table, throughput, write_csv

PLAIN, POOL, NGINX = "rampart-plain", "rampart-pool", "nginx-pool"
TARGET = 1.10  # project target: rampart-pool CPU/request <= 1.10 x rampart-plain


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir = Path(argv[1])
    meta = json.loads((run_dir / "meta.json").read_text())
    runs = [run_numbers(rec) for rec in load_jsonl(run_dir / "runs.jsonl")]

    tput = throughput(runs, meta["proxies"])
    for t in tput.values():
        t["cpu_ratio_vs_plain"] = ratio(t["cpu_us_per_req"], tput.get(PLAIN, {}).get("cpu_us_per_req"))
        t["cpu_ratio_vs_nginx_pool"] = ratio(t["cpu_us_per_req"], tput.get(NGINX, {}).get("cpu_us_per_req"))

    # The same ratio round by round (runs next to each other in time), which
    # is less exposed to slow drift of the machine than the ratio of medians.
    by_round = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["proxy"]] = r["cpu_us_per_req"]
    paired = [ratio(v.get(POOL), v.get(PLAIN)) for _, v in sorted(by_round.items())]
    paired = [x for x in paired if x is not None]

    s = meta["settings"]
    print()
    print(f"Pool CPU cost  (wrk -t{s['threads']} -c{s['conns']} -d{s['duration']}, median of {s['rounds']} round(s); "
          f"proxy on CPU {s['proxy_cpu']}, wrk+origins on CPU {s['load_cpu']}; access logs: {s['access_log']})")
    print(f"  rampart-plain: 1 backend, no health checks (run.sh's config)")
    print(f"  rampart-pool:  3 backends, balance={s['balance']}, active checks every {s['health_interval']}")
    print(f"  nginx-pool:    3 servers, {s['nginx_balance']}, keepalive 64")
    rows = [[p, fmt(t["rps"], ",.0f"), fmt(t["p99_ms"], ".2f"), fmt(t["cpu_us_per_req"], ".2f"),
             f"{fmt(t['cpu_us_per_req_min'], '.2f')}..{fmt(t['cpu_us_per_req_max'], '.2f')}",
             fmt(t["cpu_cores"], ".2f"), fmt(t["cpu_ratio_vs_plain"], ".2f"),
             fmt(t["cpu_ratio_vs_nginx_pool"], ".2f"), t["errors"]]
            for p, t in tput.items()]
    if rows:
        print(table(["proxy", "req/s", "p99 ms", "CPU us/req", "(min..max)", "cores",
                     "vs plain", "vs nginx-pool", "errors"], rows))
    else:
        print("(no measured runs)")

    verdict = None
    pool_ratio = tput.get(POOL, {}).get("cpu_ratio_vs_plain")
    if pool_ratio is not None:
        verdict = "within" if pool_ratio <= TARGET else "OVER"
        print()
        print(f"rampart-pool / rampart-plain CPU per request: {pool_ratio:.2f} "
              f"(target <= {TARGET:.2f}: {verdict})"
              + (f"; per round: {', '.join(f'{x:.2f}' for x in paired)}" if paired else ""))
    print()
    print("'vs plain' = CPU us/req over rampart-plain's; 'vs nginx-pool' = over nginx-pool's (lower is better).")
    print("Only ratios within one run are meaningful: the machine is shared and noisy.")

    write_csv(run_dir / "runs.csv", runs)
    (run_dir / "summary.json").write_text(json.dumps(
        {"meta": meta, "throughput": tput, "pool_vs_plain_per_round": paired,
         "target": TARGET, "verdict": verdict, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
