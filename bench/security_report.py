#!/usr/bin/env python3
"""Tables for one bench/security.sh run.

  security_report.py RUN_DIR   print the table; write runs.csv and summary.json into RUN_DIR

Every figure is the median over rounds. The cost of a stage is its CPU per
request minus rampart-plain's, in the same run, also taken round by round
(neighbouring runs, less exposed to drift). Standard library only.
"""

import json
import statistics
import sys
from pathlib import Path

from report import fmt, load_jsonl, run_numbers, table, throughput, write_csv

PLAIN = "rampart-plain"
TARGETS = {"rampart-waf": 5.0, "rampart-ratelimit": 1.0}  # project targets, us/request over plain


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir = Path(argv[1])
    meta = json.loads((run_dir / "meta.json").read_text())
    runs = [run_numbers(rec) for rec in load_jsonl(run_dir / "runs.jsonl")]
    tput = throughput(runs, meta["proxies"])
    plain = tput.get(PLAIN, {}).get("cpu_us_per_req")

    by_round = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["proxy"]] = r["cpu_us_per_req"]
    deltas = {}
    for p in TARGETS:
        per_round = [v[p] - v[PLAIN] for _, v in sorted(by_round.items())
                     if v.get(p) is not None and v.get(PLAIN) is not None]
        deltas[p] = {
            "median_delta_us": round(tput[p]["cpu_us_per_req"] - plain, 3) if p in tput and plain else None,
            "paired_delta_us": round(statistics.median(per_round), 3) if per_round else None,
            "per_round_us": [round(x, 3) for x in per_round],
            "target_us": TARGETS[p],
        }

    s = meta["settings"]
    print()
    print(f"Security stage CPU cost  (wrk -t{s['threads']} -c{s['conns']} -d{s['duration']}, median of "
          f"{s['rounds']} round(s); proxy on CPU {s['proxy_cpu']}, wrk+origin on CPU {s['load_cpu']}; "
          f"access logs: {s['access_log']})")
    print(f"  rampart-plain:     run.sh's one-backend proxy")
    print(f"  rampart-waf:       the same with {s['rules']} custom WAF rules, none matching (all evaluated)")
    print(f"  rampart-ratelimit: the same with one rate limit counting every request (never refusing)")
    rows = [[p, fmt(t["rps"], ",.0f"), fmt(t["p99_ms"], ".2f"), fmt(t["cpu_us_per_req"], ".2f"),
             f"{fmt(t['cpu_us_per_req_min'], '.2f')}..{fmt(t['cpu_us_per_req_max'], '.2f')}",
             fmt(t["cpu_us_per_req"] - plain if plain else None, "+.2f"), t["errors"]]
            for p, t in tput.items()]
    print(table(["proxy", "req/s", "p99 ms", "CPU us/req", "(min..max)", "vs plain us", "errors"], rows))
    print()
    for p, d in deltas.items():
        if d["paired_delta_us"] is None:
            continue
        verdict = "within" if d["paired_delta_us"] <= d["target_us"] else "OVER"
        rounds = ", ".join(f"{x:+.2f}" for x in d["per_round_us"])
        print(f"{p}: {d['paired_delta_us']:+.2f} us/request over plain, median of rounds ({rounds}); "
              f"target <= +{d['target_us']:.0f} us: {verdict}")
    print("Only differences within one run are meaningful: the machine is shared and noisy.")

    write_csv(run_dir / "runs.csv", runs)
    (run_dir / "summary.json").write_text(json.dumps(
        {"meta": meta, "throughput": tput, "deltas": deltas, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
