"""Which text encoders must an erase touch in a FLUX.1 model? Each digit erased from the FLUX-layout digits demo
(`fewshot_erase/demo_flux`, demo/FLUX.md) with its six sample pictures, in CLIP-L only, T5 only, or both, with the
SD 1.x demo's erase settings; judged by the same classifier on images generated with the demo's settings.

    python -m benchmarks.flow_encoders --out benchmarks/results/flow_encoders.json            # ~20 min, one thread
    python -m benchmarks.flow_encoders --digits 7 --encoders t5 --images 10 --out /tmp/x.json

Needs the test extra (scikit-learn).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from demo.measure import FLUX_DEMO, SAMPLES, flux_demo_settings, judged_flux

# the word prompt, the numeral prompt (another way to name the digit) and a phrasing no training caption used
PROMPTS = {"word": "a photo of the digit {w}", "numeral": "a photo of the digit {n}", "heldout": "the numeral {w}"}


def judged(pipe, digit: int, count: int, generation: dict, kind: str = "word") -> float:
    from demo.data import DIGIT_WORDS

    return judged_flux(pipe, PROMPTS[kind].format(w=DIGIT_WORDS[digit], n=digit), digit, count, generation)


def run(digits, encoders, count, seeds, workdir: Path, model: Path = FLUX_DEMO) -> list[dict]:
    import torch

    from demo.data import DIGIT_WORDS
    from fewshot_erase.api import erase
    from fewshot_erase.models import load_pipeline_parts, resolve_model
    from fewshot_erase.outputs import load_erased_encoders

    torch.set_num_threads(1)
    erase_settings, generation = flux_demo_settings()
    parts = load_pipeline_parts(resolve_model(str(model)), device="cpu")
    base = {d: judged(parts.pipeline, d, count, generation) for d in range(10)}
    base_kinds = {d: {kind: judged(parts.pipeline, d, count, generation, kind) for kind in PROMPTS} for d in digits}
    rows = []
    for digit in digits:
        word = DIGIT_WORDS[digit]
        for encoder, seed in ((e, s) for e in encoders for s in seeds):
            output = workdir / f"{word}-{encoder}-{seed}"
            started = time.perf_counter()
            result = erase(word, [SAMPLES / word], output, model=str(model), device="cpu", seed=seed,
                           encoder=encoder, preserve=tuple(w for w in DIGIT_WORDS if w != word), **erase_settings)
            wall = time.perf_counter() - started
            pipe = type(parts.pipeline)(**{**parts.pipeline.components, **load_erased_encoders(output, parts)})
            pipe.set_progress_bar_config(disable=True)
            others = {d: judged(pipe, d, count, generation) for d in range(10) if d != digit}
            drops = [base[d] - after for d, after in others.items()]
            effect = result.record["effects"]["erased"][word]
            rows.append({"digit": digit, "encoder": encoder, "seed": seed, "before": base_kinds[digit],
                         "after": {kind: judged(pipe, digit, count, generation, kind) for kind in PROMPTS},
                         "others_mean_drop": statistics.mean(drops),
                         "others_worst_drop": max(drops), "steps": result.record["steps"],
                         "verdict": effect["verdict"], "erase_seconds": wall})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--encoders", default="clip-l,t5,all")
    parser.add_argument("--images", type=int, default=20, help="judged images per digit")
    parser.add_argument("--seeds", default="0,1", help="erase seeds")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=FLUX_DEMO,
                        help="another FLUX-layout digits model (python -m demo.train_flux --encoder-drop 0.15: both encoders carry the digit)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        rows = run([int(d) for d in args.digits.split(",")], args.encoders.split(","), args.images,
                   [int(s) for s in args.seeds.split(",")], Path(workdir), args.model)
    summary = {}
    for encoder in args.encoders.split(","):
        mine = [row for row in rows if row["encoder"] == encoder]
        summary[encoder] = {**{f"{kind}_after_mean": statistics.mean(r["after"][kind] for r in mine) for kind in PROMPTS},
                            "fully_erased_all_prompts": sum(all(v == 0 for v in r["after"].values()) for r in mine),
                            "runs": len(mine),
                            "others_mean_drop": statistics.mean(r["others_mean_drop"] for r in mine),
                            "others_worst_drop": max(r["others_worst_drop"] for r in mine),
                            "steps_mean": statistics.mean(r["steps"] for r in mine),
                            "erase_seconds_mean": statistics.mean(r["erase_seconds"] for r in mine)}
    args.out.write_text(json.dumps({"model": str(args.model), "images": args.images, "summary": summary, "runs": rows},
                                   indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
