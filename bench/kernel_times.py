#!/usr/bin/env python3
"""Sums an Nsight Compute CSV (`ncu --csv --metrics gpu__time_duration.sum`) by kernel name:
where a program's GPU time goes, and how many kernels it launched.

    ncu --csv --metrics gpu__time_duration.sum --log-file k.csv PROGRAM...
    python3 bench/kernel_times.py k.csv [--top 25]
"""

import argparse
import collections
import csv


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with open(args.csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    total, count = collections.Counter(), collections.Counter()
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "ns": 1e-6, "us": 1e-3, "ms": 1.0}
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"][:90]
        total[name] += float(row["Metric Value"].replace(",", "")) * scale.get(row.get("Metric Unit", "ns"), 1e-6)
        count[name] += 1
    all_ms = sum(total.values())
    print(f"{sum(count.values())} kernels, {all_ms:.1f} ms of GPU time")
    print(f"{'ms':>9} {'share':>6} {'count':>6}  kernel")
    for name, ms in total.most_common(args.top):
        print(f"{ms:9.2f} {100 * ms / all_ms:5.1f}% {count[name]:6d}  {name}")


if __name__ == "__main__":
    main()
