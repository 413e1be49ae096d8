#!/usr/bin/env python3
"""Summarise one perfdhcp output (run with -x t) as one line: rate, drops, delays, p99.

    summarise.py NAME FILE
    summarise.py --burst NAME FILE START END     (wall-clock seconds around the run)
"""
import re
import sys


def parse(path):
    text = open(path, errors="replace").read()
    rate = re.search(r"Rate: ([0-9.]+) 4-way exchanges/second", text)
    stats = {}
    for sec, body in re.findall(r"\*\*\*Statistics for: ([A-Z-]+)\*\*\*\n(.*?)(?=\n\*\*\*|\Z)", text, re.S):
        d = {}
        for k, v in re.findall(r"^([a-z ]+): ([0-9.]+)", body, re.M):
            d[k.strip()] = float(v)
        stats[sec] = d
    delays = {}
    for sec, body in re.findall(r"\*\*\*Timestamps for packets: ([A-Z-]+)\*\*\*\n(.*?)(?=\n\*\*\*|\n\n|\Z)", text, re.S):
        ds = []
        for s, r in re.findall(r"sent / received: ([0-9.]+) / ([0-9.]+)", body):
            ds.append((float(r) - float(s)) * 1000.0)
        delays[sec] = sorted(ds)
    return text, (float(rate.group(1)) if rate else 0.0), stats, delays


def pct(xs, p):
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))
    return xs[i]


def main():
    args = sys.argv[1:]
    burst = args and args[0] == "--burst"
    if burst:
        args = args[1:]
    name, path = args[0], args[1]
    text, rate, stats, delays = parse(path)
    do = stats.get("DISCOVER-OFFER", {})
    ra = stats.get("REQUEST-ACK", {})
    drops = int(do.get("drops", 0) + ra.get("drops", 0))
    if burst:
        start, end = float(args[2]), float(args[3])
        acked = int(ra.get("received packets", 0))
        print(f"{name:8s} burst: {acked} clients leased, perfdhcp wall time {end - start:.2f} s, "
              f"drops {drops}, max delay DO {do.get('max delay', float('nan')):.1f} ms "
              f"RA {ra.get('max delay', float('nan')):.1f} ms")
        return
    d_do, d_ra = delays.get("DISCOVER-OFFER", []), delays.get("REQUEST-ACK", [])
    print(f"{name:8s} {rate:8.0f} exchanges/s  sent {int(do.get('sent packets', 0))}/{int(ra.get('sent packets', 0))} "
          f"drops {drops}  avg delay DO {do.get('avg delay', float('nan')):.2f} ms RA {ra.get('avg delay', float('nan')):.2f} ms  "
          f"p99 DO {pct(d_do, 99):.2f} ms RA {pct(d_ra, 99):.2f} ms  max {max(do.get('max delay', 0), ra.get('max delay', 0)):.1f} ms")


if __name__ == "__main__":
    main()
