"""A several-concept erase tried against the triples' last nine: each concept's ascent steps also push its captions
away from the OTHER erased concepts' pictures, `--pictures` of each a step, so that no erased prompt lands on
another erased concept (in zero+six+nine the default erase leaves "zero" and "six" drawing nines, held there by the
retain term while nine is erased around them).

    python -m benchmarks.cross_rows                                   # all 120 triples (about half an hour)
    python -m benchmarks.cross_rows --groups 0,6,9/2,8,9 --pictures 2 -o /tmp/cross_rows.json
    python -m benchmarks.cross_rows --groups 0,6,9 --what-is-drawn benchmarks/results/cross_rows_drawn.json

Each run is the default erase (`erase_concepts`, seed 0, the shipped pictures) with `unlearning.erase_step` wrapped,
judged as `benchmarks.robustness --triples` judges (the word prompt, 20 images, seeds 3000-3019); with
`--what-is-drawn`, `benchmarks.what_is_drawn`'s readings of the same erases instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

from demo.data import DIGIT_WORDS
from demo.measure import JUDGED_SEEDS, SAMPLES

TRIPLES = "/".join(",".join(map(str, group)) for group in itertools.combinations(range(10), 3))


def crossing(pictures: int):
    """Replacements for unlearning.run (to know the run's targets) and unlearning.erase_step (its picked pictures
    followed by `pictures` random ones of each other erased concept, all captioned with the stepped concept)."""
    import torch

    from fewshot_erase import unlearning

    shipped_run, shipped_step, erased = unlearning.run, unlearning.erase_step, []

    def run(parts, targets, *args, **kwargs):
        erased[:] = [t for t in targets if not t.anchor]
        return shipped_run(parts, targets, *args, **kwargs)

    def erase_step(loop, target, picked, templates, kept, held, step):
        others = [t for t in erased if t.concept != target.concept] if not target.anchor else []
        if not others:
            return shipped_step(loop, target, picked, templates, kept, held, step)
        latents, extra = [target.latents], []
        for other in others:
            for _ in range(pictures):
                index = torch.randint(other.image_count, (1,), generator=loop.generator).item()
                extra.append(len(target.latents) + len(extra))  # where this picture lands in the joined latents
                latents.append(other.latents[index:index + 1])
        crossed = dataclasses.replace(target, latents=torch.cat(latents))
        more = [templates[k % len(templates)] for k in range(len(extra))]
        return shipped_step(loop, crossed, picked + extra, templates + more, kept, held, step)

    return mock.patch.multiple(unlearning, run=run, erase_step=erase_step)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=TRIPLES, help="digits erased together, groups separated by /")
    parser.add_argument("--pictures", type=int, default=1, help="pictures of each other erased concept per step")
    parser.add_argument("-o", "--output", default="benchmarks/results/cross_rows.json")
    parser.add_argument("--what-is-drawn", metavar="JSON", help="what each erased prompt draws, written here instead")
    args = parser.parse_args(argv)
    if args.what_is_drawn:
        from benchmarks import what_is_drawn

        with crossing(args.pictures):
            groups = ",".join(group.replace(",", "") for group in args.groups.split("/"))
            return what_is_drawn.main(["--groups", groups, "-o", args.what_is_drawn])

    import warnings

    import torch

    from benchmarks.robustness import judged_run, summary
    from demo.measure import accuracy_table, load_base
    from fewshot_erase.errors import EraseWarning

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", EraseWarning)
    parts, generation = load_base()
    seeds = JUDGED_SEEDS
    base = accuracy_table(parts.pipeline, seeds, generation, kinds=("word",))
    runs = []
    with tempfile.TemporaryDirectory() as workdir, crossing(args.pictures):
        for group in args.groups.split("/"):
            digits = [int(d) for d in group.split(",")]
            started = time.perf_counter()
            run = judged_run(parts, generation, base, {d: SAMPLES / DIGIT_WORDS[d] for d in digits}, seeds, Path(workdir))
            runs.append(run)
            print("+".join(DIGIT_WORDS[d] for d in digits) + ": " + ", ".join(
                f"{100 * run['erased_after'][d]:.0f}% ({run['verdicts'][d]})" for d in digits)
                + f", worst other -{100 * run['others_worst_drop']:.0f}, {run['steps']} steps"
                + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    report = {"pictures": args.pictures, "images": len(seeds), "summary": summary(runs), "runs": runs}
    print(json.dumps(report["summary"], indent=2))
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
