"""CPU threads: the same erase timed with 1 and 2 torch threads, on a quiet machine and with one core kept busy.

    python -m benchmarks.threads                      # seven from the demo, 3 timings per cell, alternating
    python -m benchmarks.threads --repeats 5 -o benchmarks/results/threads.json

Each timing is a whole `fewshot-erase erase` process (what a user waits for), with OMP_NUM_THREADS and
`--threads` set to the count; "loaded" runs a busy loop on one core for the whole timing, as another job would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo.measure import SAMPLES

BUSY = "while True: pass"


def timed_erase(threads: int, workdir: Path, concept: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "fewshot_erase", "erase", concept, str(SAMPLES / concept), "-o",
               str(workdir / "out"), "--overwrite", "-q", "--threads", str(threads)]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - started


def measure(counts: list[int], repeats: int, concept: str) -> dict:
    timings = {f"{load} {count}": [] for load in ("quiet", "loaded") for count in counts}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(repeats):
            for load in ("quiet", "loaded"):
                busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "loaded" else None
                try:
                    # alternate the order, so that neither count always runs right after the other
                    for count in counts if repeat % 2 == 0 else counts[::-1]:
                        timings[f"{load} {count}"].append(timed_erase(count, Path(workdir), concept))
                finally:
                    if busy:
                        busy.kill()
                        busy.wait()
    return {"concept": concept, "repeats": repeats, "cpu_count": os.cpu_count(),
            "load_average_end": list(os.getloadavg()),
            "cells": {cell: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
                             "seconds": values} for cell, values in timings.items()}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concept", default="seven")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    report = measure([int(n) for n in args.threads.split(",")], args.repeats, args.concept)
    for cell, figures in report["cells"].items():
        print(f"{cell:>10} threads: median {figures['median_s']:.1f} s (min {figures['min_s']:.1f}, max {figures['max_s']:.1f})")
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
