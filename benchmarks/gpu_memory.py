"""The memory estimate against a real erase: `gpu_memory.estimate` on fake tensors, and `fewshot_erase.erase` itself
on a pipeline of random weights built from the same configs and saved to disk, with the same settings (six random
pictures, two steps, the preset's kept concepts). On the CPU the measured peak is the profiler's: the highest running
sum of every allocation and free; on a GPU, `torch.cuda.max_memory_allocated`.

    python -m benchmarks.gpu_memory --demo                          # the demo's architecture, CPU, seconds
    python -m benchmarks.gpu_memory --family sd1 --resolution 256   # SD 1.5's, CPU: a few minutes, ~10 GB of RAM
    python -m benchmarks.gpu_memory --family sdxl --device cuda     # on a GPU machine (bf16), each family
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import tempfile
from pathlib import Path

GIB = 2 ** 30


def profiled_peak(run) -> tuple[int, object]:
    """The highest sum of live CPU allocations while `run()` ran, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = run()
    # each operation's own allocations net of its own frees (its children count theirs), and the frees of tensors
    # that died outside any operation, in the order they happened
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.end):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, result


def cuda_peak(run) -> tuple[int, object]:
    import torch

    torch.cuda.reset_peak_memory_stats()
    result = run()
    return torch.cuda.max_memory_allocated(), result


def random_pipeline_folder(family_name: str, folder: Path | None, dtype: str, where: Path) -> Path:
    """The architecture with random weights, saved as a diffusers folder the erase loads like any other."""
    import torch

    from fewshot_erase import families
    from fewshot_erase.gpu_memory import fake_pipeline

    pipeline = fake_pipeline(families.FAMILIES[family_name], getattr(torch, dtype), folder)  # real tensors here
    pipeline.save_pretrained(str(where))
    return where


def random_pictures(where: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    where.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(where / f"{index}.png")
    return where


def main() -> None:
    from fewshot_erase import erase
    from fewshot_erase.concepts import COMMON_CONCEPTS
    from fewshot_erase.gpu_memory import PICTURES, PRESETS, STEPS, WATCHED, estimate
    from fewshot_erase.models import DEMO_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="the demo's architecture (its own configs)")
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--preset", default="preserve", choices=sorted(PRESETS))
    parser.add_argument("--low-memory", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (fp32, the profiler) or cuda (bf16, the allocator)")
    args = parser.parse_args()
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    folder = DEMO_DIR if args.demo else None
    estimated = estimate(args.family, args.resolution, args.preset, args.low_memory, dtype, folder)
    options = {**PRESETS[args.preset], "steps": STEPS, "until_window": STEPS, "low_memory": args.low_memory,
               "device": args.device, "dtype": dtype, "resolution": estimated.resolution,
               "templates": None, "auto_preserve": False}
    if args.preset != "published":  # the concepts the estimate watches (and, with weight 1, keeps)
        options.update(preserve=tuple(COMMON_CONCEPTS[:WATCHED]), preserve_weight=options.get("preserve_weight", 0.0))
    with tempfile.TemporaryDirectory() as scratch:
        model = random_pipeline_folder(args.family, folder, "float16" if args.device != "cpu" else "float32",
                                       Path(scratch) / "model")
        pictures = random_pictures(Path(scratch) / "pictures", PICTURES, estimated.resolution)
        measure = profiled_peak if args.device == "cpu" else cuda_peak
        measured, _ = measure(lambda: erase("the concept", [pictures], Path(scratch) / "out", model=str(model),
                                            **options))
    print(json.dumps({
        "model": "demo" if args.demo else args.family, "resolution": estimated.resolution, "preset": args.preset,
        "low_memory": args.low_memory, "device": args.device, "dtype": dtype,
        "estimated_peak_gib": estimated.peak / GIB,
        "estimated_at_peak_gib": {kind: size / GIB for kind, size in estimated.at_peak.items()},
        "measured_peak_gib": measured / GIB, "estimate_over_measured": estimated.peak / measured,
    }, indent=2))


if __name__ == "__main__":
    main()
