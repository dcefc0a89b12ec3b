"""What the default erase costs over the bare published method on the demo: issue 7's "wall time at most 2x".

    python -m benchmarks.overhead                      # every digit, erase seeds 0,1,2, both methods
    python -m benchmarks.overhead --digits 7 --seeds 0

Each digit is erased with its six sample images by the bare method (`efficacy.METHODS["published"]`) and by the
default, one right after the other in one process, so both see the same machine state; the wall time is the public
API call's (`fewshot_erase.api.erase_concepts`: images, model, the report before and after, training, saving).
One warm-up erase first, untimed (imports and first-call allocations belong to neither method). No judging: the
efficacy benchmark says whether the digits are gone; this one only times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.efficacy import METHODS, SAMPLES


def timed_erase(word: str, options: dict, output: Path) -> tuple[float, int]:
    from fewshot_erase.api import erase_concepts
    from fewshot_erase.concepts import ConceptSpec

    started = time.perf_counter()
    result = erase_concepts([ConceptSpec(word, (str(SAMPLES / word),))], output, device="cpu", **options)
    return time.perf_counter() - started, result.record["steps"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--seeds", default="0,1,2", help="erase seeds")
    parser.add_argument("--json", default="benchmarks/results/overhead.json")
    args = parser.parse_args(argv)

    import warnings

    import torch
    from rich.console import Console
    from rich.table import Table

    from demo.data import DIGIT_WORDS
    from fewshot_erase.errors import EraseWarning

    torch.set_num_threads(2)
    warnings.simplefilter("ignore", EraseWarning)  # "no --model given: the demo": said once here instead
    methods = {"published": METHODS["published"], "default": METHODS["default"]}
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        timed_erase("seven", methods["published"], workdir / "warm-up")
        for seed in [int(s) for s in args.seeds.split(",")]:
            for digit in [int(d) for d in args.digits.split(",")]:
                run = {"digit": digit, "seed": seed}
                for method, options in methods.items():
                    seconds, steps = timed_erase(DIGIT_WORDS[digit], {**options, "seed": seed},
                                                 workdir / f"{method}-{digit}-{seed}")
                    run[method] = {"seconds": seconds, "steps": steps}
                runs.append(run)
    summary = {}
    for method in methods:
        seconds = [run[method]["seconds"] for run in runs]
        steps = [run[method]["steps"] for run in runs]
        summary[method] = {"seconds_mean": statistics.mean(seconds), "seconds_median": statistics.median(seconds),
                           "steps_mean": statistics.mean(steps), "steps_range": [min(steps), max(steps)]}
    summary["ratio_of_means"] = summary["default"]["seconds_mean"] / summary["published"]["seconds_mean"]
    summary["ratio_of_medians"] = summary["default"]["seconds_median"] / summary["published"]["seconds_median"]
    results = {"runs": runs, "summary": summary, "threads": torch.get_num_threads()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    table = Table(title="the default erase against the bare method, demo, CPU")
    for column in ("digit", "seed", "bare s", "bare steps", "default s", "default steps", "ratio"):
        table.add_column(column)
    for run in runs:
        bare, default = run["published"], run["default"]
        table.add_row(str(run["digit"]), str(run["seed"]), f"{bare['seconds']:.2f}", str(bare["steps"]),
                      f"{default['seconds']:.2f}", str(default["steps"]), f"{default['seconds'] / bare['seconds']:.2f}")
    Console().print(table)
    Console().print_json(json.dumps(summary))
    return results


if __name__ == "__main__":
    main()
