"""GPU memory of an SD 3.5 Large or FLUX.1 [dev] erase, by which encoders train and how much of T5: `fewshot-erase
memory`'s estimate (the real erase on fake tensors, full-size architectures) over a grid of choices.

    python -m benchmarks.flow_memory --out benchmarks/results/flow_memory.json    # ~20 min on 2 cores
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import time
from pathlib import Path

# (family, --encoder, --t5-layers): CLIP alone, T5 alone, T5's first quarter of blocks, everything
GRID = [
    ("flux", "clip-l", None), ("flux", "t5", None), ("flux", "t5", (0, 1, 2, 3, 4, 5)), ("flux", "all", None),
    ("flux", "all", (0, 1, 2, 3, 4, 5)),
    ("sd3", "clip-l,clip-g", None), ("sd3", "t5", None), ("sd3", "t5", (0, 1, 2, 3, 4, 5)), ("sd3", "all", None),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args(argv)
    from fewshot_erase import gpu_memory

    rows = []
    for family, encoder, layers in GRID:
        for low_memory in (False, True):
            started = time.perf_counter()
            result = gpu_memory.report(gpu_memory.estimate(family, args.resolution, "default", low_memory,
                                                           encoder=encoder, t5_layers=layers))
            result["estimate_seconds"] = time.perf_counter() - started
            rows.append(result)
            print(f"{family} --encoder {encoder} --t5-layers {layers} low_memory={low_memory}: "
                  f"{result['peak_gib']:.2f} GiB {result['at_peak_gib']}", flush=True)
            args.out.write_text(json.dumps({"resolution": args.resolution, "estimates": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
