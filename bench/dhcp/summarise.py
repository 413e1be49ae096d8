#!/usr/bin/env python3
"""Summarise one perfdhcp output (run with -x t) as one line: rate, drops, delays, p99.

    summarise.py NAME FILE...    (several perfdhcp instances of one run: summed and merged)
    summarise.py --burst NAME FILE START END     (wall-clock seconds around the run)

The burst is perfdhcp's `--scenario avalanche`: every client sends its DISCOVER at once and
retransmits (with backoff, like firmware) until it holds a lease, so the run ends when all are
leased; its duration is clients / perfdhcp's rate. The burst line ends with `all_leased_s=X`
(or `all_leased_s=nan` when some client never got a lease) for run.sh to compute the ratio.
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
        clients = int(do.get("sent packets", 0))
        resent = {k: sum(int(x) for x in re.findall(k + r": still waiting for [0-9]+ answers, resent ([0-9]+)", text))
                  for k in ("DISCOVER-OFFER", "REQUEST-ACK")}
        complete = clients > 0 and acked == clients and rate > 0
        took = clients / rate if complete else float("nan")
        print(f"{name:8s} burst: {acked}/{clients} clients leased, all leased in {took:.2f} s "
              f"(perfdhcp wall time {end - start:.2f} s), retransmissions DISCOVER {resent['DISCOVER-OFFER']} "
              f"REQUEST {resent['REQUEST-ACK']}, max delay DO {do.get('max delay', float('nan')):.1f} ms "
              f"RA {ra.get('max delay', float('nan')):.1f} ms  all_leased_s={took:.3f}")
        return
    # Rate phase: one or more perfdhcp instances run side by side; sum and merge them.
    runs = [(rate, stats, delays)] + [parse(p)[1:] for p in args[2:]]
    total = sum(r for r, _, _ in runs)

    def summed(sec, key):
        return sum(st.get(sec, {}).get(key, 0) for _, st, _ in runs)

    def merged(sec):
        return sorted(d for _, _, dl in runs for d in dl.get(sec, []))

    def avg(sec):
        n = summed(sec, "received packets")
        s = sum(st.get(sec, {}).get("avg delay", 0) * st.get(sec, {}).get("received packets", 0) for _, st, _ in runs)
        return s / n if n else float("nan")

    drops = int(summed("DISCOVER-OFFER", "drops") + summed("REQUEST-ACK", "drops"))
    mx = max(max(st.get("DISCOVER-OFFER", {}).get("max delay", 0), st.get("REQUEST-ACK", {}).get("max delay", 0)) for _, st, _ in runs)
    d_do, d_ra = merged("DISCOVER-OFFER"), merged("REQUEST-ACK")
    print(f"{name:8s} {total:8.0f} exchanges/s  sent {int(summed('DISCOVER-OFFER', 'sent packets'))}/{int(summed('REQUEST-ACK', 'sent packets'))} "
          f"drops {drops}  avg delay DO {avg('DISCOVER-OFFER'):.2f} ms RA {avg('REQUEST-ACK'):.2f} ms  "
          f"p99 DO {pct(d_do, 99):.2f} ms RA {pct(d_ra, 99):.2f} ms  max {mx:.1f} ms")


if __name__ == "__main__":
    main()
