"""The memory estimate against real allocations: `gpu_memory.estimate` on fake tensors, and the same run on real
tensors of random weights on this CPU, whose peak of live torch allocations the profiler reads (every allocation
and free, in order). Same code, same settings; fp32, the CPU's dtype.

    python -m benchmarks.gpu_memory --demo                 # the demo's architecture, seconds
    python -m benchmarks.gpu_memory --family sd1 --resolution 256   # SD 1.5's, a few minutes and ~8 GB of RAM
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json

GIB = 2 ** 30


def profiled_peak(run) -> tuple[int, object]:
    """The highest sum of live CPU allocations while `run()` ran, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = run()
    # each operation's own allocations net of its own frees (its children count theirs), and the frees of tensors
    # that died outside any operation, in the order they happened
    events = sorted(profiler.events(), key=lambda e: e.time_range.end)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, result


def main() -> None:
    from fewshot_erase.gpu_memory import estimate
    from fewshot_erase.models import DEMO_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="the demo's architecture (its own configs)")
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--preset", default="preserve")
    parser.add_argument("--low-memory", action="store_true")
    args = parser.parse_args()
    options = dict(resolution=args.resolution, preset=args.preset, low_memory=args.low_memory, dtype="float32",
                   folder=DEMO_DIR if args.demo else None)
    estimated = estimate(args.family, **options)
    measured, real = profiled_peak(lambda: estimate(args.family, fake=False, **options))
    print(json.dumps({
        "model": "demo" if args.demo else args.family, "resolution": estimated.resolution, "preset": args.preset,
        "low_memory": args.low_memory,
        "estimated_peak_gib": estimated.peak / GIB, "estimated_at_peak_gib": {k: v / GIB for k, v in estimated.at_peak.items()},
        "tracker_on_real_tensors_gib": real.peak / GIB, "profiler_measured_peak_gib": measured / GIB,
        "estimate_over_measured": estimated.peak / measured,
    }, indent=2))


if __name__ == "__main__":
    main()
